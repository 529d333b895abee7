"""Reading delimited ratings files as parsed chunks, in parallel byte ranges.

Lines are parsed a whole range at a time (see parse.py) instead of one Beam
element per line: the per-element cost of a runner would dominate otherwise.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.errors import InputError
from pipeline.io.parse import LineFormat, header_columns, parse_range

SPLIT_BYTES = 64 << 20   # range size for uncompressed files


@dataclasses.dataclass(frozen=True)
class FileRange:
    """Bytes [start, stop) of a file (stop None: to the end); the lines that start
    in the range belong to it."""
    path: str
    start: int
    stop: int | None
    compressed: bool
    fmt: LineFormat


@dataclasses.dataclass(frozen=True)
class ReadConfig:
    pattern: str
    delimiter: str
    headers: bool
    data_type: str
    split_bytes: int = SPLIT_BYTES
    max_id_length: int | None = None


class _PlanRanges(beam.DoFn):
    def __init__(self, config: ReadConfig):
        self._config = config

    def process(self, meta: fileio.FileMetadata):
        cfg = self._config
        path = meta.path
        compression = CompressionTypes.detect_compression_type(path)
        compressed = compression != CompressionTypes.UNCOMPRESSED
        fmt = LineFormat(cfg.delimiter, has_header=cfg.headers, max_id_length=cfg.max_id_length)
        if cfg.data_type == 'web_views':
            header = _first_nonblank_line(path, compression)
            if header:
                try:
                    columns, width = header_columns(header, cfg.delimiter)
                except ValueError as e:
                    raise InputError(f'{path}: {e}') from None
                fmt = LineFormat(cfg.delimiter, columns, width, nonnegative=True,
                                 has_header=True, quoted=True,
                                 max_id_length=cfg.max_id_length)
            else:   # an empty (or all blank) file
                fmt = LineFormat(cfg.delimiter, exact_fields=-1, quoted=True)
        if compressed or meta.size_in_bytes <= cfg.split_bytes:
            yield FileRange(path, 0, None, compressed, fmt)
            return
        for start in range(0, meta.size_in_bytes, cfg.split_bytes):
            stop = min(start + cfg.split_bytes, meta.size_in_bytes)
            yield FileRange(path, start, stop, False, fmt)


def _first_nonblank_line(path: str, compression: str) -> str:
    """The file's first line that is not blank ('' if none): its header."""
    with FileSystems.open(path, compression_type=compression) as f:
        line = f.readline().removeprefix(b'\xef\xbb\xbf')
        while line and not line.strip():
            line = f.readline()
    return line.decode('utf-8', 'replace')


def iter_range_bytes(rng: FileRange, block_bytes: int = SPLIT_BYTES
                     ) -> Iterator[tuple[int, bytes]]:
    """(offset of the first line, whole lines' bytes) pieces of a range. A compressed
    file (one range: it cannot be split) is streamed in pieces of about block_bytes
    of uncompressed text, so memory stays one piece, not the whole file."""
    if not rng.compressed:
        yield read_range_bytes(rng)
        return
    with FileSystems.open(rng.path) as f:   # AUTO compression by suffix
        offset = 0
        while True:
            data = f.read(block_bytes)
            if not data:
                return
            if not data.endswith(b'\n'):
                data += f.readline()          # finish the line that crosses the cut
            yield offset, data
            offset += len(data)


def read_range_bytes(rng: FileRange) -> tuple[int, bytes]:
    """(offset of the first owned line, the owned lines' bytes) of an uncompressed
    range."""
    with FileSystems.open(rng.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        pos = rng.start
        if pos > 0:
            f.seek(pos - 1)
            if f.read(1) != b'\n':              # mid-line: that line is the previous range's
                pos += len(f.readline())
        if rng.stop is None:
            return pos, f.read()
        if pos >= rng.stop:
            return pos, b''
        data = f.read(rng.stop - pos)
        if data and not data.endswith(b'\n'):
            data += f.readline()                # finish the line that crosses stop
        return pos, data


class _ParseRange(beam.DoFn):
    """FileRange -> ParsedChunks: one per range, or one per streamed piece of a
    compressed file."""

    def __init__(self, block_bytes: int = SPLIT_BYTES):
        self._counters: dict = {}
        self._block_bytes = block_bytes

    def _count(self, name: str, n: int) -> None:
        if name not in self._counters:
            self._counters[name] = Metrics.counter('wals', name.replace(':', '_'))
        self._counters[name].inc(n)

    def process(self, rng: FileRange):
        started = time.time()
        for offset, data in iter_range_bytes(rng, self._block_bytes):
            chunk = parse_range(data, rng.path, offset, rng.fmt)
            del data
            for name, n in chunk.counts.items():
                self._count(name, n)
            chunk.started_at = started
            yield chunk


class ReadRatings(beam.PTransform):
    """PBegin -> PCollection[ParsedChunk]: every file matching the pattern (globs,
    .gz and other suffix-detected compression), parsed in byte ranges."""

    def __init__(self, config: ReadConfig):
        super().__init__()
        self._config = config

    def expand(self, pbegin):
        return (pbegin
                | 'Match' >> fileio.MatchFiles(self._config.pattern)
                | 'PlanRanges' >> beam.ParDo(_PlanRanges(self._config))
                | 'Spread' >> beam.Reshuffle()
                | 'Parse' >> beam.ParDo(_ParseRange(self._config.split_bytes)))

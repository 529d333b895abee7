"""Reading delimited ratings files as parsed chunks, in parallel byte ranges.

Lines are parsed a whole range at a time (see parse.py) instead of one Beam
element per line: the per-element cost of a runner would dominate otherwise.
Memory stays about one range (or one piece of a compressed file) whatever the
bytes: a line longer than --max_line_bytes is streamed past (pipeline.io.lines),
a damaged compressed file is an error naming the byte and line where it broke
(pipeline.io.decompress), and a FIFO, device or directory is refused up front.
"""
from __future__ import annotations

import dataclasses
import os
import stat
import time
from typing import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.errors import InputError
from pipeline.io.decompress import is_compressed, open_uncompressed
from pipeline.io.lines import OverlongLine, Piece, line_pieces
from pipeline.io.parse import LineFormat, header_columns, overlong_chunk, parse_range
from pipeline.options import DEFAULT_MAX_ABS_VALUE, DEFAULT_MAX_LINE_BYTES, ConfigError

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
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_abs_value: float | None = DEFAULT_MAX_ABS_VALUE


def special_file_kind(path: str) -> str | None:
    """What a local path is when it is not a regular file ('a directory', 'a FIFO
    (named pipe)', ...), or None (a regular file, a missing one, or not local)."""
    if FileSystems.get_scheme(path) not in (None, 'file'):
        return None
    try:
        mode = os.stat(path.removeprefix('file://')).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISDIR, 'a directory'), (stat.S_ISFIFO, 'a FIFO (named pipe)'),
                       (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'),
                       (stat.S_ISSOCK, 'a socket')):
        if test(mode):
            return kind
    return 'not a regular file'


def special_file_message(path: str, kind: str, flag: str) -> str:
    return (f'{flag} {path} is {kind}: input must be regular files (a stream cannot be '
            'split into ranges or read again; save it to a file first)')


def check_input_files(pattern: str, flag: str = '--input') -> list[str]:
    """The paths a pattern matches, each checked before any work: ConfigError when
    nothing matches, for a directory, FIFO or device (opening a FIFO would wait
    for a writer; a device may never end), or a file that cannot be opened."""
    try:
        metas = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:   # noqa: BLE001 - the filesystem's own error says why
        raise ConfigError(f'cannot list {flag} {pattern}: {e}') from None
    if not metas:
        raise ConfigError(f'no file matches {flag} {pattern}')
    paths = sorted(m.path for m in metas)
    for path in paths:
        kind = special_file_kind(path)
        if kind is not None:
            raise ConfigError(special_file_message(path, kind, flag))
        try:
            FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED).close()
        except Exception as e:   # noqa: BLE001
            raise ConfigError(f'cannot read {flag} {path}: {e}') from None
        if is_compressed(path):
            try:   # its first stream's header: the right format, with a check?
                with open_uncompressed(path) as f:
                    f.read(1)
            except InputError as e:
                raise ConfigError(f'{flag}: {e.plain}') from None
    return paths


class _PlanRanges(beam.DoFn):
    def __init__(self, config: ReadConfig):
        self._config = config

    def process(self, meta: fileio.FileMetadata):
        cfg = self._config
        path = meta.path
        kind = special_file_kind(path)
        if kind is not None:
            raise InputError(special_file_message(path, kind, 'input'))
        compressed = is_compressed(path)
        limits = dict(max_id_length=cfg.max_id_length, max_line_bytes=cfg.max_line_bytes,
                      max_abs_value=cfg.max_abs_value)
        fmt = LineFormat(cfg.delimiter, has_header=cfg.headers, **limits)
        if cfg.data_type == 'web_views':
            header = _first_nonblank_line(path, cfg.max_line_bytes)
            if header:
                try:
                    columns, width = header_columns(header, cfg.delimiter)
                except ValueError as e:
                    raise InputError(f'{path}: {e}') from None
                fmt = LineFormat(cfg.delimiter, columns, width, nonnegative=True,
                                 has_header=True, quoted=True, **limits)
            else:   # an empty (or all blank) file
                fmt = LineFormat(cfg.delimiter, exact_fields=-1, quoted=True,
                                 max_line_bytes=cfg.max_line_bytes)
        if compressed or meta.size_in_bytes <= cfg.split_bytes:
            yield FileRange(path, 0, None, compressed, fmt)
            return
        for start in range(0, meta.size_in_bytes, cfg.split_bytes):
            stop = min(start + cfg.split_bytes, meta.size_in_bytes)
            yield FileRange(path, start, stop, False, fmt)


def _first_nonblank_line(path: str, max_line_bytes: int) -> str:
    """The file's first line that is not blank ('' if none): its header. A header
    longer than max_line_bytes is an InputError (it is never held whole)."""
    first = True
    with open_uncompressed(path) as f:
        for offset, piece in line_pieces(f, 0, None, 1 << 16, max_line_bytes):
            if isinstance(piece, OverlongLine):
                raise InputError(f'{path}: the header line (at byte {offset:,}) is longer '
                                 f'than --max_line_bytes {max_line_bytes:,}')
            for line in piece.split(b'\n'):
                if first:                    # a UTF-8 byte order mark is not the header
                    line, first = line.removeprefix(b'\xef\xbb\xbf'), False
                if line.strip():
                    return line.decode('utf-8', 'replace')
    return ''


def iter_range_bytes(rng: FileRange, block_bytes: int = SPLIT_BYTES,
                     max_line_bytes: int | None = None) -> Iterator[Piece]:
    """(offset, whole lines' bytes) pieces of a range, and (offset, OverlongLine)
    for each line longer than max_line_bytes (default: the range's format's, else
    DEFAULT_MAX_LINE_BYTES) that did not fit in its piece, streamed past. A
    compressed file (one range: it cannot be split) is streamed in pieces of about
    block_bytes of uncompressed text; an uncompressed range is read in pieces of
    block_bytes (one piece when the range is no longer). Memory: one piece."""
    limit = max_line_bytes or rng.fmt.max_line_bytes or DEFAULT_MAX_LINE_BYTES
    if rng.compressed:
        with open_uncompressed(rng.path) as f:
            yield from line_pieces(f, 0, None, block_bytes, limit)
        return
    with open_uncompressed(rng.path) as f:
        pos, mid_line = rng.start, False
        if pos > 0:
            f.seek(pos - 1)
            mid_line = f.read(1) != b'\n'    # that line is the previous range's
        yield from line_pieces(f, pos, rng.stop, block_bytes, limit, mid_line=mid_line)


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
            if isinstance(data, OverlongLine):
                chunk = overlong_chunk(rng.path, data)
            else:
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

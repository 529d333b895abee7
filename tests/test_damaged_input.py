"""Damaged and endless input (issue 18 §2, §5): a truncated or corrupt compressed file
is an error naming the file and the byte and line where it broke, for every codec
Beam reads by suffix; a line longer than --max_line_bytes is a bad line streamed
past, never held; FIFOs and devices are refused up front; memory stays bounded
whatever the bytes."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import subprocess
import sys
import zlib

import apache_beam as beam
import numpy as np
import pytest
import zstandard
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsSingleton
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.io.decompress import DamagedFile, UncheckedFile
from pipeline.io.lines import OverlongLine
from pipeline.io.parse import LineFormat, _parse_columnar, parse_lines
from pipeline.io.read import FileRange, ReadConfig, ReadRatings, check_input_files, \
    iter_range_bytes
from pipeline.io.read_summary import SummarizeReads, number_bad_lines
from pipeline.options import ConfigError
from pipeline.store.publish import SUCCESS
from tests.conftest import ROOT

CODECS = {
    'gz': gzip.compress,
    'bz2': bz2.compress,
    'xz': lzma.compress,
    'deflate': zlib.compress,
    'zst': lambda data: zstandard.ZstdCompressor(write_checksum=True).compress(data),
}


def ratings_text(n: int = 4000, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return ''.join(f'u{u}\ti{i}\t{r}\t88125{n}\n' for n, (u, i, r) in enumerate(zip(
        rng.integers(0, 300, n), rng.integers(0, 200, n), rng.integers(1, 6, n)))).encode()


TEXT = ratings_text()


def read_all(path) -> bytes:
    """The text of a file as the pipeline's reader streams it (small pieces)."""
    rng = FileRange(str(path), 0, None, True, LineFormat('\t'))
    pieces = list(iter_range_bytes(rng, block_bytes=5000))
    assert not any(isinstance(p, OverlongLine) for _, p in pieces)
    return b''.join(p for _, p in pieces)


def where(message: str) -> tuple[int, int]:
    """(byte, line) an error message names."""
    found = re.search(r'byte ([\d,]+) of the uncompressed text \(line ([\d,]+)\)', message)
    assert found, message
    return int(found.group(1).replace(',', '')), int(found.group(2).replace(',', ''))


# --- §2: every codec, cut and corrupted ----------------------------------------------

@pytest.mark.parametrize('codec', sorted(CODECS))
@pytest.mark.parametrize('cut', ['header', 'mid-block', 'last byte', 'last 4 bytes'])
def test_a_truncated_compressed_file_is_an_error_naming_file_byte_and_line(tmp_path, codec,
                                                                         cut):
    data = CODECS[codec](TEXT)
    keep = {'header': 3, 'mid-block': len(data) // 2, 'last byte': len(data) - 1,
            'last 4 bytes': len(data) - 4}[cut]
    path = tmp_path / f'ratings.tsv.{codec}'
    path.write_bytes(data[:keep])
    with pytest.raises(DamagedFile) as info:
        read_all(path)
    message = info.value.plain
    assert str(path) in message and 'truncated' in message
    byte, line = where(message)
    # The text up to that byte decoded correctly, and the line is counted in it.
    assert byte <= len(TEXT) and line == TEXT[:byte].count(b'\n') + 1


@pytest.mark.parametrize('codec', sorted(CODECS))
@pytest.mark.parametrize('at', [3, 2])
def test_a_corrupt_compressed_file_is_an_error_naming_the_file(tmp_path, codec, at):
    data = bytearray(CODECS[codec](TEXT))
    data[len(data) // at] ^= 0x55            # a flipped byte inside the compressed data
    path = tmp_path / f'ratings.tsv.{codec}'
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFile) as info:
        read_all(path)
    assert str(path) in info.value.plain and 'corrupt' in info.value.plain
    where(info.value.plain)   # names where it was found (damaged text may decode first)


def test_a_corrupt_gzip_is_placed_to_within_a_few_hundred_bytes(tmp_path):
    """zlib loses the output of the call that fails: the reader replays that step in
    small pieces, so the message names where decoding stopped, not the step's start."""
    data = bytearray(gzip.compress(TEXT))
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    path = tmp_path / 'ratings.tsv.gz'
    path.write_bytes(bytes(data))
    d, rest, decoded = zlib.decompressobj(zlib.MAX_WBITS | 16), bytes(data), b''
    with pytest.raises(zlib.error):            # where zlib itself stops, byte by byte
        while True:
            decoded += d.decompress(rest, 1)
            rest = d.unconsumed_tail
    with pytest.raises(DamagedFile) as info:
        read_all(path)
    byte, line = where(info.value.plain)
    assert len(decoded) - 256 <= byte <= len(decoded), (byte, len(decoded))
    assert line == decoded[:byte].count(b'\n') + 1


@pytest.mark.parametrize('codec', sorted(CODECS))
def test_concatenated_streams_are_read_whole(tmp_path, codec):
    """Multi-member gzip (and concatenated bzip2, xz, zstd, zlib streams) is one text,
    as gzip -d reads it; zero bytes after the last gzip member are padding."""
    other = ratings_text(3000, seed=1)
    path = tmp_path / f'ratings.tsv.{codec}'
    padding = b'\0' * 100 if codec == 'gz' else b''
    path.write_bytes(CODECS[codec](TEXT) + CODECS[codec](other) + padding)
    assert read_all(path) == TEXT + other


@pytest.mark.parametrize('name, data', [
    ('no-checksum.tsv.zst', zstandard.ZstdCompressor().compress(TEXT)),
    ('legacy.tsv.lzma', lzma.compress(TEXT, format=lzma.FORMAT_ALONE)),
    ('no-check.tsv.xz', lzma.compress(TEXT, check=lzma.CHECK_NONE)),
])
def test_a_compressed_file_without_an_integrity_check_is_refused(tmp_path, name, data):
    """Damage inside such a file could not be detected: refused, before any work."""
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UncheckedFile, match='no integrity check'):
        read_all(path)
    with pytest.raises(ConfigError, match='no integrity check'):
        check_input_files(str(path))


def train(*args: str, env: dict | None = None, timeout: int = 600):
    return subprocess.run([sys.executable, '-m', 'pipeline.train', *args], cwd=ROOT,
                          env=dict(env or os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """The `error: ...` lines (argparse's start with the program's name)."""
    return [line for line in stderr.splitlines()
            if re.match(r'(python -m pipeline\.\w+: |wals \w+: )?error: ', line)]


def test_a_gz_cut_in_the_middle_is_not_published(tmp_path):
    """Before: the 1,150 lines before the cut were read silently and published."""
    data = gzip.compress(TEXT)
    path = tmp_path / 'cut.tsv.gz'
    path.write_bytes(data[:len(data) // 2])
    proc = train('--input', str(path), '--output', str(tmp_path / 'out'), '--num_iters', '1')
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    (error,) = error_lines(proc.stderr)
    assert str(path) in error and 'truncated' in error and '(line ' in error
    assert not (tmp_path / 'out').exists() and not list(tmp_path.glob('out.tmp-*'))


def test_a_truncated_gz_on_cloud_storage_is_not_published(tmp_path):
    from tests.gcs_support import gcs_emulator
    with gcs_emulator(tmp_path, 'damaged') as emulator:
        data = gzip.compress(TEXT)
        with FileSystems.create('gs://damaged/in/cut.tsv.gz',
                                compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data[:len(data) * 2 // 3])
        proc = train('--input', 'gs://damaged/in/cut.tsv.gz', '--output', 'gs://damaged/out',
                     '--num_iters', '1', env=dict(os.environ, **emulator.env()))
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert 'Traceback' not in proc.stderr
        (error,) = error_lines(proc.stderr)
        assert 'gs://damaged/in/cut.tsv.gz' in error and 'truncated' in error
        assert list(emulator.list_objects('damaged')) == ['in/cut.tsv.gz']


# --- §5: lines too long to hold, and inputs that never end -----------------------------

def test_an_overlong_line_is_bad_wherever_it_falls(tmp_path):
    """Long lines inside a piece (judged by the parser) and across pieces and ranges
    (streamed past): each one bad line, line_too_long, with its exact line number;
    the same for a .gz (one streamed range)."""
    rng = np.random.default_rng(3)
    lines = [f'u{u}\ti{i}\t{r}' for u, i, r in zip(rng.integers(0, 50, 1500),
                                                    rng.integers(0, 40, 1500),
                                                    rng.integers(1, 6, 1500))]
    long_at = {10: 300, 400: 5000, 401: 150, 1200: 20_000, 1499: 999}   # index: bytes
    for n, size in long_at.items():
        lines[n] = f'u1\ti1\t3\t{"z" * size}'          # a long ignored column
    text = ('\n'.join(lines) + '\n').encode()
    (tmp_path / 'r.tsv').write_bytes(text)
    (tmp_path / 'r.tsv.gz').write_bytes(gzip.compress(text))
    want = sorted(n + 1 for n, size in long_at.items() if size + 9 > 200)
    for name in ('r.tsv', 'r.tsv.gz'):
        cfg = ReadConfig(str(tmp_path / name), '\t', False, 'ratings', split_bytes=997,
                         max_line_bytes=200)
        with BeamTestPipeline() as p:
            chunks = p | ReadRatings(cfg)
            summary = chunks | beam.CombineGlobally(SummarizeReads())
            bad = (chunks | beam.FlatMap(number_bad_lines, AsSingleton(summary))
                   | beam.Map(lambda j: (json.loads(j)['line'], json.loads(j)['reason'])))
            assert_that(bad, equal_to([(n, 'line_too_long') for n in want]), label='bad')
            counts = summary | beam.Map(lambda s: (s.counts['lines_read'], s.counts['kept']))
            assert_that(counts, equal_to([(1500, 1500 - len(want))]), label='counts')


def test_the_fast_path_leaves_long_lines_to_the_line_parser():
    fmt = LineFormat('\t', max_line_bytes=20)
    clean = b'1\t2\t3\n4\t5\t6\n'
    assert _parse_columnar(clean, 'f', 0, fmt) is not None
    data = clean + b'7\t8\t' + b'9' * 30 + b'\r\n'
    assert _parse_columnar(data, 'f', 0, fmt) is None
    chunk = parse_lines(data, 'f', 0, fmt)
    assert [(b.index, b.reason) for b in chunk.bad] == [(2, 'line_too_long')]
    # 20 bytes and a \r before the newline: not too long.
    assert not parse_lines(b'1\t2\t' + b'3' * 16 + b'\r\n', 'f', 0, fmt).bad


@pytest.mark.parametrize('special', ['/dev/zero', '/dev/null'])
def test_a_device_is_refused_before_anything_reads_it(special):
    """Before: --input /dev/zero grew to 24 GB and was killed by the kernel."""
    with pytest.raises(ConfigError, match='character device'):
        check_input_files(special)


def test_a_fifo_is_refused_up_front_instead_of_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / 'ratings.fifo'
    os.mkfifo(fifo)
    proc = train('--input', str(fifo), '--output', str(tmp_path / 'out'), timeout=120)
    assert proc.returncode == 2
    (error,) = error_lines(proc.stderr)
    assert str(fifo) in error and 'FIFO' in error
    assert not (tmp_path / 'out').exists()


PEAK_RSS = r'''
import json, resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                      text=True)
print(json.dumps({'code': proc.returncode, 'stderr': proc.stderr[-3000:],
                  'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
'''


def peak_rss(*args: str) -> tuple[float, int, str]:
    """(peak RSS in MiB, exit code, stderr) of one `python -m pipeline.train` run,
    measured by a fresh parent process whose only child it is."""
    out = subprocess.run([sys.executable, '-c', PEAK_RSS, sys.executable, '-m',
                          'pipeline.train', *args], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result['peak_kib'] / 1024, result['code'], result['stderr']


def test_memory_stays_bounded_on_200_mb_without_a_newline(tmp_path, small_ratings):
    """200 MB of one line, plain and .gz: the run fails (one bad line, line_too_long)
    and its peak RSS stays within a fixed budget above a normal small run's (before:
    the line was held whole and copied: about +500 MiB plain and +700 MiB gz; now
    about +40 and +100)."""
    block = b'x' * (1 << 20)
    compressor = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    with open(tmp_path / 'line.tsv', 'wb') as plain, open(tmp_path / 'line.tsv.gz', 'wb') as gz:
        for _ in range(200):
            plain.write(block)
            gz.write(compressor.compress(block))
        gz.write(compressor.flush())
    base, code, _ = peak_rss('--input', str(small_ratings), '--output', str(tmp_path / 'ok'),
                             '--num_iters', '1')
    assert code == 0 and (tmp_path / 'ok' / SUCCESS).exists()
    budget = base + 250
    for name in ('line.tsv', 'line.tsv.gz'):
        peak, code, stderr = peak_rss('--input', str(tmp_path / name), '--output',
                                      str(tmp_path / f'out-{name}'), '--num_iters', '1')
        assert code == 1 and 'line_too_long 1' in stderr, stderr
        assert peak < budget, f'{name}: peak RSS {peak:.0f} MiB, budget {budget:.0f} MiB'
        assert not (tmp_path / f'out-{name}').exists()

"""Compressed inputs are streamed: parsed in pieces of whole lines (memory: one
piece, not the file), with the same lines, counts and line numbers as one read."""
from __future__ import annotations

import gzip
import json

import apache_beam as beam
from apache_beam.pvalue import AsSingleton
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to

from pipeline.io.parse import LineFormat
from pipeline.io.read import FileRange, ReadConfig, ReadRatings, iter_range_bytes
from pipeline.io.read_summary import SummarizeReads, number_bad_lines


def more_than(n: int):
    def check(actual):
        if actual[0] <= n:
            raise BeamAssertException(f'{actual[0]} chunks: the file was not streamed')
    return check


def test_a_compressed_file_is_read_in_pieces_of_whole_lines(tmp_path):
    lines = [f'{u}\t{u % 7}\t{u % 5 + 1}'.encode() + b'x' * (u % 13) for u in range(3000)]
    text = b'\n'.join(lines) + b'\n'
    path = tmp_path / 'r.tsv.gz'
    path.write_bytes(gzip.compress(text))
    rng = FileRange(str(path), 0, None, True, LineFormat('\t'))
    pieces = list(iter_range_bytes(rng, block_bytes=1000))
    assert len(pieces) > 40
    assert b''.join(p for _, p in pieces) == text
    longest = max(len(l) for l in lines) + 1
    offset = 0
    for start, piece in pieces:
        assert start == offset and piece.endswith(b'\n') and len(piece) <= 1000 + longest
        offset += len(piece)


def test_streamed_gz_keeps_every_line_and_exact_line_numbers(tmp_path):
    lines = ['visitId,clientId,contentId,timeOnPage']
    lines += [f'{n},c{n % 11},{n % 9},{"bad" if n % 41 == 0 else n % 30}' for n in range(1, 2000)]
    path = tmp_path / 'views.csv.gz'
    path.write_bytes(gzip.compress(('\n'.join(lines) + '\n').encode()))
    cfg = ReadConfig(str(path), ',', False, 'web_views', split_bytes=500)
    with BeamTestPipeline() as p:
        chunks = p | ReadRatings(cfg)
        summary = chunks | beam.CombineGlobally(SummarizeReads())
        numbered = (chunks | beam.FlatMap(number_bad_lines, AsSingleton(summary))
                    | beam.Map(lambda j: json.loads(j)['line']))
        # Line n + 1 of the file is visit n (the header is line 1).
        assert_that(numbered, equal_to([n + 1 for n in range(1, 2000) if n % 41 == 0]),
                    label='bad line numbers')
        kept = chunks | beam.FlatMap(lambda c: zip(c.users.tolist(), c.items.tolist()))
        assert_that(kept, equal_to([(f'c{n % 11}', str(n % 9)) for n in range(1, 2000)
                                    if n % 41]), label='kept')
        pieces = chunks | beam.combiners.Count.Globally()
        assert_that(pieces, more_than(40), label='pieces')
        counts = summary | beam.Map(lambda s: (s.counts['header'], s.counts['lines_read']))
        assert_that(counts, equal_to([(1, 2000)]), label='counts')


def test_a_gz_larger_than_beams_default_read_is_read_to_the_end(tmp_path):
    """Beam's CompressedFile.read() with no size returns 16 MiB only: the old reader,
    which read a compressed file in one read(), silently dropped the rest."""
    line = b'1\t2\t3\n'
    n = (17 << 20) // len(line) + 1          # a little over 16 MiB of text
    path = tmp_path / 'big.tsv.gz'
    path.write_bytes(gzip.compress(line * n, compresslevel=1))
    with BeamTestPipeline() as p:
        kept = (p | ReadRatings(ReadConfig(str(path), '\t', False, 'ratings'))
                | beam.Map(lambda c: c.counts['kept']) | beam.CombineGlobally(sum))
        assert_that(kept, equal_to([n]))

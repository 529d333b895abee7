"""Line accounting of a read: counts by outcome, the --max_bad_fraction check, and
the file and line number of each bad line (for OUTPUT/errors/)."""
from __future__ import annotations

import dataclasses
from collections import Counter

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import AsSingleton

from pipeline.errors import InputError
from pipeline.io.parse import BadLine, ParsedChunk
from pipeline.io.read import ReadConfig, ReadRatings
from pipeline.strict_json import dumps


@dataclasses.dataclass
class ReadSummary:
    """What reading found: line counts by outcome, where each range's lines start,
    files whose first line was bad (a header?) and the first bad lines."""
    counts: Counter
    started_at: float
    ranges: dict          # path -> sorted [(range offset, lines in range)]
    header_suspects: list
    bad_examples: list    # BadLine, first by (path, offset)

    def line_number(self, path: str, range_offset: int, index: int) -> int:
        """1-based line number in its file of line `index` of the range at range_offset."""
        before = sum(n for off, n in self.ranges.get(path, []) if off < range_offset)
        return before + index + 1

    def bad_total(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith('bad:'))

    def line_report(self) -> dict:
        """lines_read = kept + skipped (header, blank) + bad, with bad by reason."""
        c = self.counts
        return {
            'lines_read': c['lines_read'], 'kept': c['kept'],
            'skipped_header': c['header'], 'skipped_blank': c['blank'],
            'bad': self.bad_total(),
            'bad_by_reason': {k[4:]: n for k, n in sorted(c.items()) if k.startswith('bad:')},
        }

    def describe_bad(self, bad: BadLine) -> str:
        return (f'{bad.path}:{self.line_number(bad.path, bad.range_offset, bad.index)}: '
                f'{bad.reason}: {bad.text[:120]!r}')


class SummarizeReads(beam.CombineFn):
    """ParsedChunks -> ReadSummary (order-independent: counts add, lists are sorted)."""
    examples = 5

    def create_accumulator(self):
        return ReadSummary(Counter(), float('inf'), {}, [], [])

    def add_input(self, acc, chunk: ParsedChunk):
        acc.counts.update(chunk.counts)
        acc.started_at = min(acc.started_at, chunk.started_at)
        acc.ranges.setdefault(chunk.path, []).append((chunk.offset, chunk.counts['lines_read']))
        if chunk.header_suspect:
            acc.header_suspects.append(chunk.path)
        examples = [dataclasses.replace(b, range_offset=chunk.offset)
                    for b in chunk.bad[:self.examples]]
        acc.bad_examples = self._first(acc.bad_examples + examples)
        return acc

    def _first(self, bad):
        return sorted(bad, key=lambda b: (b.path, b.offset))[:self.examples]

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out.counts.update(a.counts)
            out.started_at = min(out.started_at, a.started_at)
            for path, ranges in a.ranges.items():
                out.ranges.setdefault(path, []).extend(ranges)
            out.header_suspects.extend(a.header_suspects)
            out.bad_examples = self._first(out.bad_examples + a.bad_examples)
        return out

    def extract_output(self, acc):
        acc.ranges = {p: sorted(r) for p, r in sorted(acc.ranges.items())}
        acc.header_suspects = sorted(set(acc.header_suspects))
        return acc


def check_reads(summary: ReadSummary, pattern: str, max_bad_fraction: float) -> ReadSummary:
    """Fails the run (InputError) on too many bad lines or no ratings at all."""
    c = summary.counts
    bad = summary.bad_total()
    data_lines = c['lines_read'] - c['header'] - c['blank']
    hint = ''
    if summary.header_suspects:
        hint = (f'\nThe first line of {", ".join(summary.header_suspects[:3])} is bad: '
                'if the file has a header line, pass --headers.')
    examples = ''.join(f'\n  {summary.describe_bad(b)}' for b in summary.bad_examples)
    if data_lines and bad / data_lines > max_bad_fraction:
        reasons = ', '.join(f'{k} {n}' for k, n in summary.line_report()['bad_by_reason'].items())
        raise InputError(
            f'{bad} of {data_lines} lines in {pattern} are bad ({bad / data_lines:.2%}), above '
            f'--max_bad_fraction {max_bad_fraction:g}: {reasons}. First bad lines:'
            f'{examples}{hint}')
    if c['kept'] == 0:
        raise InputError(f'no ratings found in {pattern} ({c["lines_read"]} lines read, '
                         f'{bad} bad, {c["blank"]} blank, {c["header"]} header){examples}{hint}')
    return summary


def bad_lines_only(chunk: ParsedChunk):
    """The chunk without its ratings, if it has bad lines (else nothing): what
    numbering them needs. Fused into the parse step, so that the step waiting for
    the read summary does not decode every rating again to find a few bad lines."""
    if chunk.bad:
        empty = np.empty(0, np.int32)
        yield dataclasses.replace(chunk, user_codes=empty, item_codes=empty,
                                  user_ids=chunk.user_ids[:0], item_ids=chunk.item_ids[:0],
                                  values=np.empty(0, np.float64))


def number_bad_lines(chunk: ParsedChunk, summary: ReadSummary):
    """JSON lines {file, line, offset, reason, text} for OUTPUT/errors/."""
    for b in chunk.bad:
        yield dumps({'file': b.path, 'line': summary.line_number(b.path, chunk.offset, b.index),
                          'offset': b.offset, 'reason': b.reason, 'text': b.text},
                         ensure_ascii=False)


class ReadAndCheck(beam.PTransform):
    """PBegin -> (ParsedChunks, singleton checked ReadSummary, bad-line JSON texts) of
    one input: too many bad lines (over max_bad_fraction), or none kept, fail the run
    with an InputError before anything downstream of the summary runs."""

    def __init__(self, config: ReadConfig, max_bad_fraction: float):
        super().__init__()
        self._config, self._max_bad = config, max_bad_fraction

    def expand(self, pbegin):
        chunks = pbegin | 'Read' >> ReadRatings(self._config)
        reads = (chunks | 'SummarizeReads' >> beam.CombineGlobally(SummarizeReads())
                 | 'CheckReads' >> beam.Map(check_reads, self._config.pattern, self._max_bad))
        bad_lines = (chunks | 'BadLinesOnly' >> beam.FlatMap(bad_lines_only)
                     | 'NumberBadLines' >> beam.FlatMap(number_bad_lines, AsSingleton(reads)))
        return chunks, reads, bad_lines

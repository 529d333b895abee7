"""--vocabulary distributed: the ID numbering without one worker holding every ID.

The numbering is finalize_ids' (wals_core/vocab.py): int64 numeric order when every
ID of a side is a canonical int64, else code-point order; an ID's index is its
rank in that order. Here it is computed by ranges of that order:

1. PlanRanges, a small CombineGlobally over the chunks: per side, whether every ID
   is a canonical int64 (an AND), and range boundaries from a sample of at most
   SAMPLE_PER_CHUNK IDs per chunk. Any boundaries give the same global order, so
   they need not be deterministic; the numbering is.
2. Each chunk sends, per side and range, its distinct IDs of that range (one
   element per (chunk, side, range), never per rating or per ID). A CoGroupByKey
   by (side, range) gathers one range: its sorted distinct IDs (the training
   chunks' IDs) and their stable hashes (wals_core.hashing.id_hashes), and answers
   every request with the IDs' ranks in the range (and -1 for a --test_input ID
   the range does not hold).
3. RangeOffsets, a tiny side input: the IDs per range, so index = offset[range] +
   rank. The answers go back to their chunk by a chunk key (CoGroupByKey) and the
   chunk's ratings become integer rows and columns, keyed by row block as
   blocks.IndexChunk would key them (blocks.index_ratings): BuildBlocks then runs
   on integers.
4. The initial factors are computed per range (per-ID seeded, row-independent, so
   the slices are the rows of the whole matrix) and placed in range order.

Only the model writer, and a run with a previous model (the comparison and the ID
changes), get the whole Vocabulary, assembled from the ranges in range order.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton

from pipeline.training.blocks import BlockConfig, IndexChunk, index_ratings
from pipeline.training.combine import InBlockOrder
from pipeline.training.factors import Factors, factors_from_matrix
from pipeline.io.parse import ParsedChunk
from wals_core.hashing import id_hashes
from wals_core.vocab import Vocabulary, canonical_int64

SIDES = ('user_ids', 'item_ids')   # ParsedChunk fields; side 0 = users (rows), 1 = items
# A range's IDs (with their requests) are held by one worker: 500k IDs of 36
# characters are about 70 MB as numpy text. Tests lower it to get several ranges.
IDS_PER_RANGE = 500_000
SAMPLE_PER_CHUNK = 256   # IDs per chunk and side in the boundary sample
MAX_SAMPLE = 1 << 18     # the sample is thinned evenly past this many IDs per side


@dataclasses.dataclass(frozen=True)
class RangePlan:
    """One side's order (numeric: int64 keys, else the ID strings) and its range
    boundaries: range r holds the keys in [boundaries[r - 1], boundaries[r])."""
    numeric: bool
    boundaries: np.ndarray

    @property
    def num_ranges(self) -> int:
        return len(self.boundaries) + 1

    def keys(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions of the IDs that can be in this vocabulary, their sort keys):
        in a numeric vocabulary only canonical int64 IDs can."""
        ids = np.asarray(ids, dtype=str)
        if not self.numeric:
            return np.arange(len(ids)), ids
        ok, values = canonical_int64(ids)
        return np.flatnonzero(ok), values[ok]

    def range_of(self, keys: np.ndarray) -> np.ndarray:
        if not len(self.boundaries):
            return np.zeros(len(keys), np.int64)
        return np.searchsorted(self.boundaries, keys, side='right').astype(np.int64)


def plan_ranges(samples: list[np.ndarray], numeric: bool, distinct_estimate: int,
                ids_per_range: int) -> RangePlan:
    """A side's RangePlan from its pooled sample (ID strings): about
    distinct_estimate / ids_per_range ranges at the sample's quantiles."""
    sample = np.concatenate(samples) if samples else np.zeros(0, dtype=str)
    keys = np.unique(sample.astype(np.int64) if numeric else sample)
    ranges = int(min(max(-(-distinct_estimate // max(ids_per_range, 1)), 1), max(len(keys), 1)))
    cuts = keys[(np.arange(1, ranges) * len(keys)) // ranges]
    return RangePlan(numeric, np.unique(cuts))


def _thin(ids: np.ndarray, most: int) -> np.ndarray:
    """At most `most` of the sorted `ids`, evenly spaced."""
    if len(ids) <= most:
        return ids
    return ids[(np.arange(most) * len(ids)) // most]


class PlanRanges(beam.CombineFn):
    """ParsedChunks -> tuple of a RangePlan per side (users, items). The accumulator
    holds, per side: all IDs canonical int64 so far, the sum of the chunks' distinct
    counts (an overestimate of the side's), and the sample."""

    def __init__(self, ids_per_range: int):
        self._ids_per_range = ids_per_range

    def create_accumulator(self):
        return [[True, 0, []] for _ in SIDES]

    def add_input(self, acc, chunk: ParsedChunk):
        for side, field in zip(acc, SIDES):
            ids = getattr(chunk, field)
            if side[0] and len(ids):
                side[0] = bool(canonical_int64(ids)[0].all())
            side[1] += len(ids)
            side[2].append(_thin(ids, SAMPLE_PER_CHUNK))
        return self._bounded(acc)

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for acc in accs:
            for o, a in zip(out, acc):
                o[0] &= a[0]
                o[1] += a[1]
                o[2].extend(a[2])
        return self._bounded(out)

    @staticmethod
    def _bounded(acc):
        for side in acc:
            if sum(len(s) for s in side[2]) > MAX_SAMPLE:
                side[2] = [_thin(np.unique(np.concatenate(side[2])), MAX_SAMPLE // 2)]
        return acc

    def extract_output(self, acc) -> tuple[RangePlan, RangePlan]:
        return tuple(plan_ranges(s[2], s[0], s[1], self._ids_per_range) for s in acc)


@dataclasses.dataclass
class IdRequest:
    """A chunk's distinct IDs of one (side, range): their positions in the chunk's
    ID array and their sort keys."""
    chunk: tuple               # chunk key: (test?, path, offset)
    positions: np.ndarray      # int64 positions in ParsedChunk.user_ids / item_ids
    keys: np.ndarray


@dataclasses.dataclass
class RangeIds:
    """One range of one side's vocabulary: its sorted IDs (keys) and their hashes."""
    side: int
    range: int
    ids: np.ndarray
    hashes: np.ndarray


@dataclasses.dataclass
class Answer:
    """The dense indices (-1: not in the vocabulary) and hashes of a request's IDs."""
    side: int
    positions: np.ndarray
    indices: np.ndarray
    hashes: np.ndarray


@dataclasses.dataclass
class RatingCodes:
    """What the join needs of a chunk: a code per rating into its distinct IDs."""
    user_codes: np.ndarray
    item_codes: np.ndarray
    values: np.ndarray
    num_ids: tuple[int, int]


class IdCount:
    """A side's vocabulary size where only its len() is needed (BuildBlocks)."""

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n


def chunk_key(chunk: ParsedChunk, test: bool) -> tuple:
    """Unique per chunk with ratings: ranges of a file own disjoint lines, so their
    first lines' offsets differ."""
    return (test, chunk.path, chunk.offset)


def _requests(chunk: ParsedChunk, plans: tuple[RangePlan, RangePlan], test: bool):
    """ParsedChunk -> ((side, range), IdRequest) per side and range it has IDs in."""
    if not len(chunk.values):
        return
    key = chunk_key(chunk, test)
    for side, (field, plan) in enumerate(zip(SIDES, plans)):
        positions, keys = plan.keys(getattr(chunk, field))
        ranges = plan.range_of(keys)
        order = np.argsort(ranges, kind='stable')
        cuts = np.flatnonzero(np.diff(ranges[order])) + 1
        for part in np.split(order, cuts):
            if len(part):
                yield (side, int(ranges[part[0]])), IdRequest(key, positions[part], keys[part])


def _tight(ids: np.ndarray) -> np.ndarray:
    """Text IDs in the narrowest fixed width, as np.array(list of str) gives them."""
    if ids.dtype.kind != 'U':
        return ids
    width = int(np.char.str_len(ids).max(initial=1)) if len(ids) else 1
    return ids.astype(f'<U{max(width, 1)}')


class _AnswerRange(beam.DoFn):
    """((side, range), {'train': requests, 'test': requests}) -> RangeIds, and on
    ANSWERS ((side, range), (chunk key, Answer with ranks in the range))."""
    ANSWERS = 'answers'

    def __init__(self):
        self._sizes = [Metrics.distribution('wals', f'{n}_range_ids') for n in ('user', 'item')]

    def process(self, keyed):
        (side, rng), groups = keyed
        train, test = list(groups['train']), list(groups['test'])
        if train:
            ids = _tight(np.unique(np.concatenate([r.keys for r in train])))
        else:   # only --test_input IDs fall in this range: none is known
            ids = np.zeros(0, np.int64 if test[0].keys.dtype.kind == 'i' else str)
        hashes = id_hashes(ids.tolist())
        self._sizes[side].update(len(ids))
        yield RangeIds(side, rng, ids, hashes)
        for r in train:
            rank = np.searchsorted(ids, r.keys)
            yield beam.pvalue.TaggedOutput(self.ANSWERS, (
                (side, rng), (r.chunk, Answer(side, r.positions, rank, hashes[rank]))))
        for r in test:
            rank = np.minimum(np.searchsorted(ids, r.keys), max(len(ids) - 1, 0))
            found = (ids[rank] == r.keys) if len(ids) else np.zeros(len(r.keys), bool)
            rank = np.where(found, rank, -1)
            yield beam.pvalue.TaggedOutput(self.ANSWERS, (
                (side, rng), (r.chunk, Answer(side, r.positions, rank, np.zeros(0, np.uint64)))))


class RangeOffsets(InBlockOrder):
    """RangeIds -> ({(side, range): index of its first ID}, (users, items) sizes)."""

    def keyed(self, r: RangeIds):
        return (r.side, r.range), len(r.ids)

    def extract_output(self, acc):   # needs the keys, not only the values in order
        offsets, totals = {}, [0, 0]
        for side, rng in sorted(acc):
            offsets[(side, rng)] = totals[side]
            totals[side] += acc[(side, rng)]
        return offsets, tuple(totals)


def _with_offset(keyed, offsets):
    (side, rng), (chunk, answer) = keyed
    indices = np.where(answer.indices >= 0,
                       answer.indices + offsets[0].get((side, rng), 0), -1)
    yield chunk, dataclasses.replace(answer, indices=indices)   # inputs are never mutated


class _IndexJoined(beam.DoFn):
    """(chunk key, {'codes': [RatingCodes], 'answers': [Answer]}) -> (row block id,
    piece), and cold-start counts on IndexChunk.COLD (test chunks)."""

    def __init__(self, config: BlockConfig):
        self._config = config

    def process(self, keyed):
        (test, _, _), groups = keyed
        codes_list = list(groups['codes'])
        if not codes_list:
            return
        codes = codes_list[0]
        index = [np.full(n, -1, np.int64) for n in codes.num_ids]
        hashes = [np.zeros(n, np.uint64) for n in codes.num_ids]
        for a in groups['answers']:
            index[a.side][a.positions] = a.indices
            if not test:
                hashes[a.side][a.positions] = a.hashes
        yield from index_ratings(self._config, test, index[0], hashes[0], index[1], hashes[1],
                                 codes.user_codes, codes.item_codes, codes.values)


def _rating_codes(chunk: ParsedChunk, test: bool):
    if len(chunk.values):
        yield chunk_key(chunk, test), RatingCodes(chunk.user_codes, chunk.item_codes,
                                                  chunk.values,
                                                  (len(chunk.user_ids), len(chunk.item_ids)))


class _AssembleVocabulary(InBlockOrder):
    """One side's RangeIds -> Vocabulary, the ranges concatenated in order."""

    def __init__(self, side: int):
        self._side = side

    def keyed(self, r: RangeIds):
        return r.range, (r.ids, r.hashes)

    def add_input(self, acc, r: RangeIds):
        return super().add_input(acc, r) if r.side == self._side else acc

    def reduce(self, ranges: list) -> Vocabulary:
        if not ranges:
            return Vocabulary(np.zeros(0, dtype=str))
        return Vocabulary(np.concatenate([r[0] for r in ranges]),
                          np.concatenate([r[1] for r in ranges]))


class _AssembleMatrix(InBlockOrder):
    """(range, rows) pieces of one side -> Factors of the whole matrix, in range order
    (the Gramian of the assembled matrix, as factors_from_matrix)."""

    def keyed(self, piece):
        return piece

    def reduce(self, pieces: list) -> Factors:
        return factors_from_matrix(np.concatenate(pieces) if pieces else
                                   np.zeros((0, 0), np.float32))


class DistributedIds(NamedTuple):
    """DistributedVocabulary's outputs (singletons unless noted)."""
    ranges: beam.PCollection       # RangeIds, several
    offsets: beam.PCollection      # RangeOffsets' output
    user_count: beam.PCollection   # IdCount
    item_count: beam.PCollection   # IdCount
    pieces: beam.PCollection       # (row block id, piece), several (and --test_input's)
    cold_start: beam.PCollection | None   # int per test chunk with cold pairs, several
    users: beam.PCollection        # Vocabulary, for the writer (gathers every user ID)
    items: beam.PCollection        # Vocabulary, for the writer (gathers every item ID)


class DistributedVocabulary(beam.PTransform):
    """PCollection[ParsedChunk] -> DistributedIds: the ratings (and those of
    `test_chunks`, pairs with an unknown ID counted as cold start) as integer
    pieces keyed by row block, numbered as finalize_ids numbers the IDs, with the
    vocabulary held by ranges (see the module docstring). `checked`: a singleton
    (the checked ReadSummary) that the range plan waits for."""

    def __init__(self, config: BlockConfig, checked, test_chunks=None,
                 ids_per_range: int | None = None):
        super().__init__()
        self._config, self._checked, self._test_chunks = config, checked, test_chunks
        self._ids_per_range = ids_per_range or IDS_PER_RANGE

    def expand(self, chunks) -> DistributedIds:
        plans = (chunks | 'PlanRanges' >> beam.CombineGlobally(PlanRanges(self._ids_per_range))
                 | 'AfterCheck' >> beam.Map(lambda plans, _: plans, AsSingleton(self._checked)))
        plans = AsSingleton(plans)
        requests = {'train': chunks | 'Requests' >> beam.FlatMap(_requests, plans, False)}
        codes = [chunks | 'Codes' >> beam.FlatMap(_rating_codes, False)]
        if self._test_chunks is not None:
            requests['test'] = self._test_chunks | 'TestRequests' >> beam.FlatMap(
                _requests, plans, True)
            codes.append(self._test_chunks | 'TestCodes' >> beam.FlatMap(_rating_codes, True))
        else:
            requests['test'] = chunks.pipeline | 'NoTestRequests' >> beam.Create([])
        answered = (requests | 'ByRange' >> beam.CoGroupByKey()
                    | 'Ranges' >> beam.ParDo(_AnswerRange()).with_outputs(
                        _AnswerRange.ANSWERS, main='ranges'))
        ranges = answered.ranges
        offsets = ranges | 'Offsets' >> beam.CombineGlobally(RangeOffsets())
        answers = answered[_AnswerRange.ANSWERS] | 'Indices' >> beam.FlatMap(
            _with_offset, AsSingleton(offsets))
        codes = tuple(codes) | 'AllCodes' >> beam.Flatten()
        indexed = ({'codes': codes, 'answers': answers} | 'ByChunk' >> beam.CoGroupByKey()
                   | 'Index' >> beam.ParDo(_IndexJoined(self._config)).with_outputs(
                       IndexChunk.COLD, main='pieces'))
        cold = indexed[IndexChunk.COLD] if self._test_chunks is not None else None
        counts = [offsets | f'{n}Count' >> beam.Map(lambda o, s: IdCount(o[1][s]), s)
                  for s, n in enumerate(('User', 'Item'))]
        vocabs = [ranges | f'{n}Vocabulary' >> beam.CombineGlobally(_AssembleVocabulary(s))
                  for s, n in enumerate(('User', 'Item'))]
        # The test pieces come out of the same ParDo as the training ones.
        return DistributedIds(ranges, offsets, counts[0], counts[1], indexed.pieces, cold,
                              vocabs[0], vocabs[1])


def initial_factors_by_range(ranges, side: str, rows_of, label: str):
    """RangeIds -> singleton Factors of one side ('row': users, 'col': items):
    `rows_of(ids, hashes)` gives the initial rows of a range's IDs."""
    s = 0 if side == 'row' else 1
    return (ranges
            | f'{label}Rows' >> beam.FlatMap(
                lambda r, s: [(r.range, rows_of(r.ids, r.hashes))] if r.side == s else [], s)
            | f'{label}Assemble' >> beam.CombineGlobally(_AssembleMatrix()))

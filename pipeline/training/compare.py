"""The previous model against the new one, on the same test pairs of this run.

For the promotion gate (--max_regression) both models are evaluated inside the
run on exactly the same pairs: this run's warm test pairs whose user and item the
previous model also knows. RMSE uses each model's own prediction (its own mode,
parameters and global mean; explicit clipped to this run's training range); the
ranking metrics rank, for the same users and relevant items, every item the model
can score that is not in the user's training pairs (an item the previous model
does not know cannot be recommended by it).
"""
from __future__ import annotations

import dataclasses
import hashlib

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import AsSingleton

from pipeline.training.block_store import BlockRef
from pipeline.training.combine import InBlockOrder
from pipeline.training.evaluate import EvalConfig
from pipeline.training.factors import Factors
from pipeline.store.model_files import cached_model_files, index_map, stored_matrix
from pipeline.training.rating_stats import RatingStats
from wals_core import objectives
from wals_core.metrics import rmse
from wals_core.models import get_model
from wals_core.params import WalsParams
from wals_core.ranking import RankingSums, rank_and_score
from wals_core.vocab import Vocabulary


@dataclasses.dataclass
class _Previous:
    """The previous model mapped into this run's row and column numbering."""
    params: WalsParams
    global_mean: float
    rows: np.ndarray       # stored matrix rows by this run's user index (0 if unknown)
    cols: np.ndarray       # stored matrix rows by this run's item index (0 if unknown)
    known_rows: np.ndarray
    known_cols: np.ndarray


# (path, digest of the user IDs, digest of the item IDs) -> _Previous: a worker maps
# the previous model once per run, not once per block. Keyed by the IDs themselves:
# two vocabularies of the same size (another run in the same process) map differently.
_MAPPED: dict = {}


def ids_digest(ids: np.ndarray) -> str:
    """SHA-256 of a vocabulary's IDs (their dtype and bytes)."""
    ids = np.ascontiguousarray(ids)
    h = hashlib.sha256(ids.dtype.str.encode())
    h.update(ids.tobytes())
    return h.hexdigest()


def _previous(path: str, users: Vocabulary, items: Vocabulary) -> _Previous:
    key = (path, ids_digest(users.ids), ids_digest(items.ids))
    prev = _MAPPED.get(key)
    if prev is None:
        model = cached_model_files(path)
        ri, ci = index_map(model.users, users.ids), index_map(model.items, items.ids)
        u, v = stored_matrix(model, 'row'), stored_matrix(model, 'col')
        rows = np.zeros((len(users), u.shape[1]), np.float32)
        cols = np.zeros((len(items), v.shape[1]), np.float32)
        rows[ri >= 0] = u[ri[ri >= 0]]
        cols[ci >= 0] = v[ci[ci >= 0]]
        prev = _MAPPED[key] = _Previous(model.params, model.global_mean, rows, cols,
                                        ri >= 0, ci >= 0)
    return prev


def _sse(rows, cols, values, u, v, params, mean, clip) -> float:
    model = get_model(params.model)
    if not model.predicts_ratings:
        return 0.0
    return objectives.predicted_squared_error(rows, cols, values, u, v, params, mean,
                                              clip if model.clips_predictions else None)


def _ranking(queries_matrix, items_matrix, params, relevant, exclude, k,
             unknown_items=None) -> RankingSums:
    queries, _ = objectives.split_bias(queries_matrix, params)
    items, bias = objectives.split_bias(items_matrix, params)
    offsets = None if bias is None else np.asarray(bias, np.float32)
    if unknown_items is not None and np.any(unknown_items):
        offsets = np.zeros(len(items), np.float32) if offsets is None else offsets.copy()
        offsets[unknown_items] = -np.inf
    return rank_and_score(queries, items, k, relevant[0], relevant[1], exclude[0],
                          exclude[1], item_offsets=offsets)


def compare_block(ref: BlockRef, users: Vocabulary, items: Vocabulary, u: Factors,
                  v: Factors, col_counts: np.ndarray, ratings: RatingStats,
                  config: EvalConfig, previous_path: str):
    """(block id, (count, new sse, previous sse, new RankingSums, previous RankingSums))."""
    block = ref.load()
    prev = _previous(previous_path, users, items)
    t = block.train
    k = config.rank_k
    user_has_train = np.diff(t.indptr) > 0
    local, cols = block.test_rows.astype(np.int64), block.test_cols.astype(np.int64)
    rows = local + block.start
    same = (user_has_train[local] & (col_counts[cols] > 0) & prev.known_rows[rows]
            & prev.known_cols[cols])
    values = block.test_values[same]
    rows, cols, local = rows[same], cols[same], local[same]
    clip = ratings.range
    new_sse = _sse(rows, cols, values, u.matrix, v.matrix, config.params, ratings.mean, clip)
    old_sse = _sse(rows, cols, values, prev.rows, prev.cols, prev.params, prev.global_mean,
                   clip)
    empty = RankingSums(k=k)
    new_rank = old_rank = empty
    relevant = values >= config.threshold(ratings)
    if k > 0 and np.any(relevant):
        rel = local[relevant], cols[relevant]
        exclude = t.indptr, t.indices
        own = slice(block.start, block.start + block.num_rows)
        new_rank = _ranking(u.matrix[own], v.matrix, config.params, rel, exclude, k)
        old_rank = _ranking(prev.rows[own], prev.cols, prev.params, rel, exclude, k,
                            unknown_items=~prev.known_cols)
    return block.block_id, (int(same.sum()), new_sse, old_sse, new_rank, old_rank)


class _SumComparison(InBlockOrder):
    def __init__(self, k: int):
        self._k = k

    def keyed(self, element):
        return element

    def reduce(self, parts: list):
        count, new_sse, old_sse = 0, 0.0, 0.0
        new_rank = old_rank = RankingSums(k=self._k)
        for c, a, b, r1, r2 in parts:
            count, new_sse, old_sse = count + c, new_sse + a, old_sse + b
            new_rank, old_rank = new_rank.add(r1), old_rank.add(r2)
        return count, new_sse, old_sse, new_rank, old_rank


def _summary(sums, config: EvalConfig, previous_params: WalsParams) -> dict:
    count, new_sse, old_sse, new_rank, old_rank = sums

    def side(sse, rank, params):
        out = {'test_rmse': rmse(sse, count) if get_model(params.model).predicts_ratings
               else None}
        if config.rank_k > 0:
            out.update(rank.summary(config.rank_k))
        return out
    return {'pairs': count, 'new': side(new_sse, new_rank, config.params),
            'previous': side(old_sse, old_rank, previous_params)}


class CompareWithPrevious(beam.PTransform):
    """PCollection[BlockRef] (row blocks) -> singleton dict {pairs, new: {test_rmse,
    precision_at_k, ...}, previous: {...}}: the new factors `u`, `v` and the model at
    `previous_path` on the same test pairs. Side inputs: users, items (Vocabulary),
    u, v (Factors), col_counts, ratings (singletons)."""

    def __init__(self, previous_path: str, previous_params: WalsParams, config: EvalConfig,
                 users, items, u, v, col_counts, ratings):
        super().__init__()
        self._path, self._prev_params, self._config = previous_path, previous_params, config
        self._inputs = (users, items, u, v, col_counts, ratings)

    def expand(self, row_blocks):
        side = [AsSingleton(x) for x in self._inputs]
        return (row_blocks
                | 'Blocks' >> beam.Map(compare_block, *side, self._config, self._path)
                | 'Sum' >> beam.CombineGlobally(_SumComparison(self._config.rank_k))
                | 'Summary' >> beam.Map(_summary, self._config, self._prev_params))

"""Train/test RMSE, ranking metrics and counts from the row blocks and the final
factors, one row block at a time."""
from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import AsSingleton

from pipeline.training.block_store import BlockRef, RatingBlock
from pipeline.training.combine import InBlockOrder
from pipeline.training.factors import Factors
from pipeline.training.rating_stats import RatingStats
from wals_core import objectives
from wals_core.metrics import rmse, squared_error
from wals_core.models import get_model
from wals_core.params import WalsParams
from wals_core.ranking import RankingSums, rank_and_score


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    params: WalsParams
    rank_k: int = 10
    relevance_threshold: float | None = None   # None: by the data (relevance_threshold())
    implicit_data: bool = False                # web_views, or --model implicit

    def threshold(self, ratings: RatingStats) -> float:
        """Test ratings at or above this are relevant: 0 for implicit data (every
        test pair), else the mean training rating unless given."""
        if self.relevance_threshold is not None:
            return self.relevance_threshold
        if self.implicit_data or get_model(self.params.model).implicit_feedback:
            return 0.0
        return ratings.mean


@dataclasses.dataclass
class BlockStats:
    train_sse: float = 0.0
    train_count: int = 0
    test_sse: float = 0.0
    test_count: int = 0
    test_cold_start: int = 0     # test ratings whose user or item has no training rating
    duplicates_merged: int = 0
    users_without_training: int = 0

    def add(self, other: 'BlockStats') -> 'BlockStats':
        return BlockStats(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                  dataclasses.astuple(other))))

    def summary(self, has_rmse: bool = True) -> dict:
        return {
            'train_rmse': rmse(self.train_sse, self.train_count) if has_rmse else None,
            'test_rmse': rmse(self.test_sse, self.test_count) if has_rmse else None,
            'train_ratings': self.train_count,
            'test_ratings': self.test_count,
            'test_cold_start_ratings': self.test_cold_start,
            'duplicates_merged': self.duplicates_merged,
            'users_without_training_ratings': self.users_without_training,
        }


@dataclasses.dataclass
class Evaluation:
    """What Evaluate reports: error sums and counts, and the ranking metrics' sums."""
    stats: BlockStats
    ranking: RankingSums
    config: EvalConfig
    relevance_threshold: float

    def summary(self) -> dict:
        """metrics.json's evaluation keys. RMSE does not apply to --model implicit
        (it predicts preferences, not ratings): null there."""
        out = self.stats.summary(
            has_rmse=get_model(self.config.params.model).predicts_ratings)
        if self.config.rank_k > 0:
            out.update(self.ranking.summary(self.config.rank_k))
        out['rank_k'] = self.config.rank_k
        out['relevance_threshold'] = self.relevance_threshold
        return out


def _squared_errors(rows, cols, values, u, v, p: WalsParams, ratings: RatingStats) -> float:
    if get_model(p.model).original_rmse:
        return squared_error(rows, cols, values, u, v)     # the original's, unchanged
    # explicit: clipped to the training range (a rating outside it is never right);
    # implicit: not used.
    return objectives.predicted_squared_error(rows, cols, values, u, v, p, ratings.mean,
                                              ratings.range)


def _block_ranking(block: RatingBlock, u: np.ndarray, v: np.ndarray, warm: np.ndarray,
                   config: EvalConfig, threshold: float) -> RankingSums:
    """Ranking metrics of one block's users: every item not in their training pairs
    is ranked (the kernel recommendations use), relevant = warm test items rated at
    or above the threshold."""
    p = config.params
    queries, _ = objectives.split_bias(u[block.start:block.start + block.num_rows], p)
    items, item_bias = objectives.split_bias(v, p)
    relevant = warm & (block.test_values >= threshold)
    return rank_and_score(queries, items, config.rank_k, block.test_rows[relevant],
                          block.test_cols[relevant], block.train.indptr,
                          block.train.indices, item_offsets=item_bias)


def block_evaluation(ref: BlockRef, users: Factors, items: Factors, col_counts: np.ndarray,
                     ratings: RatingStats, config: EvalConfig
                     ) -> tuple[int, tuple[BlockStats, RankingSums]]:
    """Squared errors of one row block's train and (warm) test ratings, and the
    ranking sums of its users."""
    block = ref.load()
    p = config.params
    t = block.train
    u, v = users.matrix, items.matrix
    rows = t.row_of_entry() + block.start
    train_sse = _squared_errors(rows, t.indices, t.values, u, v, p, ratings)
    user_has_train = np.diff(t.indptr) > 0
    warm = user_has_train[block.test_rows] & (col_counts[block.test_cols] > 0)
    test_rows = block.test_rows[warm].astype(np.int64) + block.start
    test_sse = _squared_errors(test_rows, block.test_cols[warm], block.test_values[warm],
                               u, v, p, ratings)
    stats = BlockStats(train_sse, t.nnz, test_sse, int(warm.sum()), int((~warm).sum()),
                       block.merged, int((~user_has_train).sum()))
    ranking = _block_ranking(block, u, v, warm, config, config.threshold(ratings)) \
        if config.rank_k > 0 else RankingSums(k=0)
    return block.block_id, (stats, ranking)


class _SumInBlockOrder(InBlockOrder):
    """(block id, (BlockStats, RankingSums)) -> the two sums, in block-id order
    (bit-stable)."""

    def __init__(self, rank_k: int):
        self._rank_k = rank_k

    def keyed(self, element):
        return element

    def reduce(self, parts: list) -> tuple[BlockStats, RankingSums]:
        total, ranking = BlockStats(), RankingSums(k=self._rank_k)
        for s, r in parts:
            total = total.add(s)
            ranking = ranking.add(r)
        return total, ranking


class Evaluate(beam.PTransform):
    """PCollection[BlockRef] (row blocks) -> singleton Evaluation for factors
    `users`, `items` (singleton Factors), `col_counts` (singleton array) and
    `ratings` (singleton RatingStats)."""

    def __init__(self, users, items, col_counts, ratings, config: EvalConfig):
        super().__init__()
        self._users, self._items, self._counts = users, items, col_counts
        self._ratings, self._config = ratings, config

    def expand(self, row_blocks):
        config = self._config

        def finish(sums, ratings: RatingStats) -> Evaluation:
            return Evaluation(sums[0], sums[1], config, config.threshold(ratings))

        return (row_blocks
                | 'BlockErrors' >> beam.Map(block_evaluation, AsSingleton(self._users),
                                            AsSingleton(self._items), AsSingleton(self._counts),
                                            AsSingleton(self._ratings), config)
                | 'Sum' >> beam.CombineGlobally(_SumInBlockOrder(config.rank_k))
                | 'Summary' >> beam.Map(finish, AsSingleton(self._ratings)))

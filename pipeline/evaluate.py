"""Train/test RMSE and counts from the row blocks and the final factors."""
from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import AsSingleton

from pipeline.block_store import BlockRef
from pipeline.combine import InBlockOrder
from pipeline.factors import Factors
from wals_core.metrics import rmse, squared_error


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

    def summary(self) -> dict:
        return {
            'train_rmse': rmse(self.train_sse, self.train_count),
            'test_rmse': rmse(self.test_sse, self.test_count),
            'train_ratings': self.train_count,
            'test_ratings': self.test_count,
            'test_cold_start_ratings': self.test_cold_start,
            'duplicates_merged': self.duplicates_merged,
            'users_without_training_ratings': self.users_without_training,
        }


def block_stats(ref: BlockRef, users: Factors, items: Factors,
                col_counts: np.ndarray) -> tuple[int, BlockStats]:
    """Squared errors of one row block's train and (warm) test ratings."""
    block = ref.load()
    t = block.train
    u, v = users.matrix, items.matrix
    rows = t.row_of_entry() + block.start
    train_sse = squared_error(rows, t.indices, t.values, u, v)
    user_has_train = np.diff(t.indptr) > 0
    warm = user_has_train[block.test_rows] & (col_counts[block.test_cols] > 0)
    test_rows = block.test_rows[warm].astype(np.int64) + block.start
    test_sse = squared_error(test_rows, block.test_cols[warm], block.test_values[warm], u, v)
    return block.block_id, BlockStats(
        train_sse, t.nnz, test_sse, int(warm.sum()), int((~warm).sum()), block.merged,
        int((~user_has_train).sum()))


class _SumInBlockOrder(InBlockOrder):
    """(block id, BlockStats) -> BlockStats, summed in block-id order (bit-stable)."""

    def keyed(self, element):
        return element

    def reduce(self, stats: list[BlockStats]) -> BlockStats:
        total = BlockStats()
        for s in stats:
            total = total.add(s)
        return total


class Evaluate(beam.PTransform):
    """PCollection[BlockRef] (row blocks) -> singleton BlockStats for factors
    `users`, `items` (singleton Factors) and `col_counts` (singleton array)."""

    def __init__(self, users, items, col_counts):
        super().__init__()
        self._users, self._items, self._counts = users, items, col_counts

    def expand(self, row_blocks):
        return (row_blocks
                | 'BlockErrors' >> beam.Map(block_stats, AsSingleton(self._users),
                                            AsSingleton(self._items), AsSingleton(self._counts))
                | 'Sum' >> beam.CombineGlobally(_SumInBlockOrder()))

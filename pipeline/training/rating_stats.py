"""Summary of the training ratings: count, sum, minimum and maximum.

The explicit mode needs the global mean μ in every solve, its RMSE clips
predictions to the training range, and the default relevance threshold of the
ranking metrics for explicit ratings is the mean training rating.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.training.block_store import BlockRef
from pipeline.training.combine import InBlockOrder


@dataclasses.dataclass(frozen=True)
class RatingStats:
    count: int = 0
    total: float = 0.0
    minimum: float = float('inf')
    maximum: float = float('-inf')

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def range(self) -> tuple[float, float] | None:
        return (self.minimum, self.maximum) if self.count else None


class SummarizeTraining(InBlockOrder):
    """Row BlockRefs -> RatingStats of their training ratings (summed in block order,
    so the mean is bit-identical on any runner)."""

    def keyed(self, ref: BlockRef):
        v = ref.load().train.values
        if not len(v):
            return ref.block_id, RatingStats()
        return ref.block_id, RatingStats(len(v), float(np.sum(v)), float(v.min()),
                                         float(v.max()))

    def reduce(self, stats: list[RatingStats]) -> RatingStats:
        count, total = 0, 0.0
        lo, hi = float('inf'), float('-inf')
        for s in stats:
            count += s.count
            total += s.total
            lo, hi = min(lo, s.minimum), max(hi, s.maximum)
        return RatingStats(count, total, lo, hi)

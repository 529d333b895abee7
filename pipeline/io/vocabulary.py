"""The vocabulary of one ID field: every distinct user (or item) ID of the input."""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from pipeline.io.parse import ParsedChunk
from wals_core.vocab import Vocabulary, finalize_ids


class DistinctIds(beam.CombineFn):
    """ParsedChunks -> sorted str array of the distinct IDs of one field (user_ids or
    item_ids)."""

    def __init__(self, field: str):
        self._field = field

    def create_accumulator(self):
        return set()

    def add_input(self, acc, chunk: ParsedChunk):
        acc.update(getattr(chunk, self._field).tolist())
        return acc

    def merge_accumulators(self, accs):
        out = set()
        for a in accs:
            out |= a
        return out

    def extract_output(self, acc):
        return np.array(sorted(acc), dtype=str)


class UniqueIds(DistinctIds):
    """ParsedChunks -> Vocabulary of one field (user_ids or item_ids)."""

    def extract_output(self, acc):
        return Vocabulary(finalize_ids(super().extract_output(acc)))

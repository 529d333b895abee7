"""Combining per-block results in block-id order, so no bundle order changes a bit."""
from __future__ import annotations

from typing import Any

import apache_beam as beam


class InBlockOrder(beam.CombineFn):
    """Collects one value per block id; `reduce` sees them sorted by block id.

    Subclasses define `keyed(element) -> (block id, value)` and
    `reduce(values in block order)`. Floating-point sums over blocks therefore
    come out bit-identical whatever order the runner delivered them in.
    """

    def keyed(self, element) -> tuple[int, Any]:
        raise NotImplementedError

    def reduce(self, values: list) -> Any:
        raise NotImplementedError

    def create_accumulator(self):
        return {}

    def add_input(self, acc, element):
        key, value = self.keyed(element)
        acc[key] = value
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for a in accs:
            out.update(a)
        return out

    def extract_output(self, acc):
        return self.reduce([acc[key] for key in sorted(acc)])

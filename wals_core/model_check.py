"""The sanity check of a trained model's factors (numpy only).

A model can come out of training broken without any error: one extreme rating
(1e20) leaves most vectors exactly zero, an implicit input without a positive
value gives an all-zero model. The check, per side:

- every stored factor (and bias) is a finite number;
- no row that has a *target* in its training data has an all-zero stored row.

A row's target is what its solve fits, and it is zero exactly when its right-hand
side is: the solution of every half-step lies in the span of the other side's
vectors of the row's entries, weighted by the targets, so a row gets an all-zero
vector only if its targets are all zero, or the solve lost them (the collapse the
check is for). Targets by objective:

- wals: the rating itself (a row whose ratings are all 0 is fit by the zero vector);
- implicit: the preference, 1 for a value > 0 (a row of 0 plays has no preference);
- explicit: the rating minus the global mean (a row of ratings all equal to the
  mean is fit by the biases of the other side alone).

Rows without training ratings (users or items seen only in the test split, or
only in --test_input) keep a zero vector legitimately and are not checked.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from wals_core.models import get_model
from wals_core.params import WalsParams


def target_entries(values: np.ndarray, params: WalsParams, global_mean: float) -> np.ndarray:
    """bool per training entry: its target is not zero (see the module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    return get_model(params.model).target_entries(values, global_mean)


def target_rows(indptr: np.ndarray, values: np.ndarray, params: WalsParams,
                global_mean: float) -> np.ndarray:
    """bool per CSR row: the row has at least one training entry with a target."""
    indptr = np.asarray(indptr, dtype=np.int64)
    hits = target_entries(values, params, global_mean)
    out = np.zeros(len(indptr) - 1, dtype=bool)
    starts = indptr[:-1][indptr[1:] > indptr[:-1]]
    if len(starts):
        # An OR from each non-empty row's start to the next one's: a byte per entry
        # (no int64 running count: 16 bytes per entry of a 20M-rating block).
        out[indptr[1:] > indptr[:-1]] = np.logical_or.reduceat(hits[:indptr[-1]], starts)
    return out


@dataclasses.dataclass
class SideCheck:
    """What the check found on one side (users: 'row', items: 'col')."""
    rows: int = 0              # rows checked (every row of the side)
    target_rows: int = 0       # rows with a target in their training data
    nonfinite_rows: int = 0    # rows with a NaN or infinite factor
    zero_rows: int = 0         # target rows whose stored row is all zero
    first_nonfinite: int = -1  # global row number of the first such row (-1: none)
    first_zero: int = -1

    def merge(self, other: 'SideCheck') -> 'SideCheck':
        def first(a: int, b: int) -> int:
            return min(x for x in (a, b) if x >= 0) if max(a, b) >= 0 else -1
        return SideCheck(self.rows + other.rows, self.target_rows + other.target_rows,
                         self.nonfinite_rows + other.nonfinite_rows,
                         self.zero_rows + other.zero_rows,
                         first(self.first_nonfinite, other.first_nonfinite),
                         first(self.first_zero, other.first_zero))


def check_rows(stored: np.ndarray, targets: np.ndarray, start: int = 0) -> SideCheck:
    """The check of a block of stored rows (k factors, + the bias for explicit),
    rows start.. of their side, with their target_rows."""
    stored = np.asarray(stored)
    finite = np.all(np.isfinite(stored), axis=1)
    zero = ~np.any(stored != 0, axis=1) & targets & finite
    bad, flat = np.flatnonzero(~finite), np.flatnonzero(zero)
    return SideCheck(len(stored), int(np.count_nonzero(targets)), len(bad), len(flat),
                     int(start + bad[0]) if len(bad) else -1,
                     int(start + flat[0]) if len(flat) else -1)


def count_zero_rows(stored: np.ndarray) -> int:
    """Rows of a stored matrix that are all zero."""
    return int(np.count_nonzero(~np.any(np.asarray(stored) != 0, axis=1)))

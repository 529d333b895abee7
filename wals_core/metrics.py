"""Squared errors and RMSE of factor predictions u_i · v_j."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from wals_core.solve import map_slices
from wals_core.sums import FixedSum


# Entries per slice: the gathered factor rows stay in cache instead of becoming
# arrays of hundreds of MB for a big block.
_SLICE = 1 << 16


def squared_error(rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
                  row_factors: np.ndarray, col_factors: np.ndarray) -> float:
    """Σ (A_ij - u_i·v_j)² over the given entries, in float64, in a fixed order
    (wals_core.sums: the same bits for any BLAS or kernel thread count)."""
    u = np.asarray(row_factors, np.float64)
    v = np.asarray(col_factors, np.float64)
    rows, cols = np.asarray(rows), np.asarray(cols)

    def predict(s: slice) -> np.ndarray:
        # np.take: the rows u[rows[s]] would give, without fancy indexing's overhead
        return np.einsum('ij,ij->i', np.take(u, rows[s], axis=0), np.take(v, cols[s], axis=0))
    return sliced_squared_error(values, predict)


def sliced_squared_error(values: np.ndarray, predict: Callable[[slice], np.ndarray]
                         ) -> float:
    """Σ (values[s] - predict(s))² over consecutive slices s of the entries, in
    float64, in a fixed order. The slices run on the kernel's threads; each slice's
    gathered factor rows stay in cache (no array of hundreds of MB for a big block),
    and predict(s) must depend on the entries of s alone."""
    values = np.asarray(values, np.float64).reshape(-1)

    def one(lo: int) -> FixedSum:
        s = slice(lo, lo + _SLICE)          # _SLICE: a multiple of sums.CHUNK
        err = values[s] - predict(s)
        return FixedSum().add_products(err, err)

    total = FixedSum()
    for part in map_slices(one, len(values), _SLICE):
        total.add_sum(part)
    return total.value


def rmse(sse: float, count: int) -> float | None:
    """sqrt(sse / count), or None when there is nothing to measure."""
    return math.sqrt(sse / count) if count else None

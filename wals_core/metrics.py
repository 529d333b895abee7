"""Squared errors and RMSE of factor predictions u_i · v_j."""
from __future__ import annotations

import math

import numpy as np

from wals_core.sums import FixedSum


# Entries per slice: the gathered factor rows stay in cache instead of becoming
# arrays of hundreds of MB for a big block.
_SLICE = 1 << 16


def squared_error(rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
                  row_factors: np.ndarray, col_factors: np.ndarray) -> float:
    """Σ (A_ij - u_i·v_j)² over the given entries, in float64, in a fixed order
    (wals_core.sums: the same bits for any BLAS thread count)."""
    if len(rows) == 0:
        return 0.0
    u = np.asarray(row_factors, np.float64)
    v = np.asarray(col_factors, np.float64)
    values = np.asarray(values, np.float64)
    total = FixedSum()
    for lo in range(0, len(rows), _SLICE):     # _SLICE: a multiple of sums.CHUNK
        s = slice(lo, lo + _SLICE)
        # np.take: the rows u[rows[s]] would give, without fancy indexing's overhead
        err = values[s] - np.einsum('ij,ij->i', np.take(u, rows[s], axis=0),
                                    np.take(v, cols[s], axis=0))
        total.add_products(err, err)
    return total.value


def rmse(sse: float, count: int) -> float | None:
    """sqrt(sse / count), or None when there is nothing to measure."""
    return math.sqrt(sse / count) if count else None

"""Squared errors and RMSE of factor predictions u_i · v_j."""
from __future__ import annotations

import math

import numpy as np


def squared_error(rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
                  row_factors: np.ndarray, col_factors: np.ndarray) -> float:
    """Σ (A_ij - u_i·v_j)² over the given entries, in float64."""
    if len(rows) == 0:
        return 0.0
    u = np.asarray(row_factors, np.float64)[rows]
    v = np.asarray(col_factors, np.float64)[cols]
    err = np.asarray(values, np.float64) - np.einsum('ij,ij->i', u, v)
    return float(err @ err)


def rmse(sse: float, count: int) -> float | None:
    """sqrt(sse / count), or None when there is nothing to measure."""
    return math.sqrt(sse / count) if count else None

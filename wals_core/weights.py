"""Observation weights of the WALS loss.

An observed entry (i, j) weighs w0 + R_i * C_j; every unobserved entry weighs w0.
With `weights` on, R_i = 1 and C_j depends on n_j, the number of training ratings
of column j (the original's `make_wts`); with it off, R = C = 0 and every entry
weighs w0 (TF's "simplifies to ALS" case).
"""
from __future__ import annotations

import numpy as np

from wals_core.params import WalsParams


def column_weights(counts: np.ndarray, params: WalsParams) -> np.ndarray:
    """C_j for every column from its training-rating count n_j (float64; 0 where n_j = 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    if not params.weights:
        return np.zeros_like(counts)
    inv = np.zeros_like(counts)
    np.divide(1.0, counts, out=inv, where=counts > 0)
    if params.wt_type == 'log':
        out = np.power(inv, params.feature_wt_exp)
        out[counts == 0] = 0.0
        return out
    return params.feature_wt_factor * inv


def row_weights(num_rows: int, params: WalsParams) -> np.ndarray:
    """R_i for every row: 1 with weights on, 0 with them off (float64)."""
    return np.full(num_rows, 1.0 if params.weights else 0.0, dtype=np.float64)

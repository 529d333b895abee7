"""The WALS half-step: solve every row of a block against the other side's factors.

For row i with observed columns j, other factors v_j, Gramian G = VᵀV:
    (w0*G + λI + Σ_j R_i*C_j v_j v_jᵀ) u_i = Σ_j (w0 + R_i*C_j) A_ij v_j
Vectorized: per-row weighted Gramians come from one sparse × dense product
against the packed upper triangles of v_j v_jᵀ, then one batched solve.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse

from wals_core.sparse import Csr

# Bound on the temporary per-chunk arrays (elements), so memory stays flat for big blocks.
_CHUNK_ELEMENTS = 1 << 23


def gramian(factors: np.ndarray) -> np.ndarray:
    """VᵀV in float64."""
    f = np.asarray(factors, dtype=np.float64)
    return f.T @ f


def solve_rows(block: Csr, self_weights: np.ndarray, other_factors: np.ndarray,
               other_weights: np.ndarray, other_gramian: np.ndarray,
               unobs_weight: float, regularization: float) -> np.ndarray:
    """Exact minimizer for every row of `block` (float64, block.num_rows × k).

    self_weights: R (or C) of the block's rows; other_weights: C (or R) of every
    row of the other side; other_gramian: VᵀV over the whole other side.
    A row with no entries gets the exact minimizer of its regularized problem: 0.
    """
    k = other_factors.shape[1]
    out = np.zeros((block.num_rows, k), dtype=np.float64)
    base = unobs_weight * np.asarray(other_gramian, dtype=np.float64) \
        + regularization * np.eye(k)
    per_row = max(1, _CHUNK_ELEMENTS // (k * k))
    per_nnz = max(1, _CHUNK_ELEMENTS // (k * (k + 1) // 2))
    start = 0
    while start < block.num_rows:
        # Rows [start, stop): at most per_row rows and (unless one row alone is
        # bigger) at most per_nnz entries.
        limit = block.indptr[start] + per_nnz
        stop = int(np.searchsorted(block.indptr, limit, side='right')) - 1
        stop = min(max(stop, start + 1), start + per_row, block.num_rows)
        out[start:stop] = _solve_chunk(block, start, stop, self_weights, other_factors,
                                       other_weights, base, unobs_weight)
        start = stop
    return out


def _solve_chunk(block: Csr, start: int, stop: int, self_weights: np.ndarray,
                 other_factors: np.ndarray, other_weights: np.ndarray, base: np.ndarray,
                 unobs_weight: float) -> np.ndarray:
    k = other_factors.shape[1]
    n = stop - start
    lo, hi = int(block.indptr[start]), int(block.indptr[stop])
    indptr = block.indptr[start:stop + 1] - lo
    cols = block.indices[lo:hi]
    vals = block.values[lo:hi]
    row_of = np.repeat(np.arange(n), np.diff(indptr))
    conf = np.asarray(self_weights, np.float64)[start:stop][row_of] \
        * np.asarray(other_weights, np.float64)[cols]          # R_i * C_j per entry

    uniq, local = np.unique(cols, return_inverse=True)
    v = np.asarray(other_factors, dtype=np.float64)[uniq]      # only the columns we touch
    shape = (n, len(uniq))
    rhs = scipy.sparse.csr_matrix(((unobs_weight + conf) * vals, local, indptr), shape) @ v

    lhs = np.broadcast_to(base, (n, k, k)).copy()
    if np.any(conf):
        iu, ju = np.triu_indices(k)
        packed = scipy.sparse.csr_matrix((conf, local, indptr), shape) @ (v[:, iu] * v[:, ju])
        lhs[:, iu, ju] += packed
        off = iu != ju
        lhs[:, ju[off], iu[off]] += packed[:, off]
    return batched_solve(lhs, rhs)


def batched_solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solves lhs[i] x[i] = rhs[i]; singular systems fall back to the least-squares
    (pseudo-inverse) answer instead of failing the batch."""
    try:
        return np.linalg.solve(lhs, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.einsum('nij,nj->ni', np.linalg.pinv(lhs, hermitian=True), rhs)

"""The three objectives (`--model`) as inputs of the one blocked solver (solve.py).

Every mode is a weighted ridge problem per row, solved by RowSolver; a mode only
chooses the weights, the targets, the regularization and the factor layout:

* wals (default; TF's WALSModel): an observed entry weighs w0 + R_i C_j (C_j from
  item popularity, weights.py), every unobserved one w0; target A_ij; λ.
* implicit (Hu, Koren & Volinsky 2008, as `implicit` and Spark's implicitPrefs): every
  pair has preference p_ij (1 for an observed rating > 0, else 0) and confidence
  1 + alpha · g(|r_ij|), g = log1p(r / epsilon) ('log') or r ('linear'); an
  unobserved pair has p = 0 and confidence 1. As solver inputs: w0 = 1, R = C = 1,
  per-entry weights E_ij = alpha · g(|r_ij|), target p_ij, λ.
* explicit (biased ALS-WR): observed entries only (w0 = 0, weight 1), target
  r_ij - μ (μ: mean training rating), per-row λ · n_i (n_i: the row's training
  ratings, as Spark's explicit ALS scales it), and per-user and per-item biases
  learned in the same solves through an augmented column: a row solves [u_i, b_i]
  against [v_j, 1] with target r_ij - μ - c_j (c_j: the item's bias, passed to the
  solver as an offset), and a column [v_j, c_j] against [u_i, 1] with r_ij - μ - b_i.
  Factor matrices of this mode carry the bias as their last column.
  Prediction: μ + b_i + c_j + u_i · v_j.

What differs between the modes is a method of the mode's class (wals_core/models.py,
`get_model(params.model)`); this module holds the steps they share.
"""
from __future__ import annotations

import numpy as np

from wals_core.metrics import sliced_squared_error
from wals_core.models import confidence, get_model, preference  # noqa: F401
from wals_core.params import WalsParams
from wals_core.solve import RowSolver, map_slices
from wals_core.sparse import Csr
from wals_core.sums import fixed_dot


def counts_scale_regularization(params: WalsParams) -> bool:
    """True when λ is multiplied by each row's training-rating count (ALS-WR)."""
    return get_model(params.model).counts_scale_regularization(params)


def has_bias(params: WalsParams) -> bool:
    """True when factor matrices carry a bias column after the k factors."""
    return get_model(params.model).has_bias


def stored_width(params: WalsParams) -> int:
    """Columns of a factor matrix as it flows between half-steps."""
    return params.latent_factors + (1 if has_bias(params) else 0)


def make_solver(train: Csr, side: str, params: WalsParams, col_counts: np.ndarray,
                start: int, other_rows: int, global_mean: float = 0.0,
                other_index: np.ndarray | None = None, **solver_options) -> RowSolver:
    """The RowSolver of one block of `side` ('row' or 'col') for the mode.

    train: the block's training ratings (rows start at `start` on its side);
    col_counts: training ratings per column of the whole matrix (the wals mode's
    popularity weights); other_rows: rows of the other side; global_mean: μ
    (explicit mode only). other_index (routed exchange): train's indices are
    positions in this sorted array of other-side rows, and the solver is given
    factors for those rows only; its answers are bit-identical to the full ones.
    The solver solves with params.solver and params.cg_steps unless solver_options
    say otherwise; for 'cg', give every solve the block's previous stored factors
    (this side's rows, the explicit mode's bias column included) as x0.
    """
    p = params
    needed = other_rows if other_index is None else len(other_index)
    solver_options = dict(dict(solver=p.solver, cg_steps=p.cg_steps), **solver_options)
    return get_model(p.model).make_solver(train, side, p, col_counts, start, other_rows,
                                          global_mean, other_index, needed, solver_options)


def solve_inputs(other: np.ndarray, params: WalsParams
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """(factors the solver multiplies, per-column offsets) from the other side's
    stored factor matrix: for explicit [V, 1] and the biases, else (V, None)."""
    if not has_bias(params):
        return other, None
    k = params.latent_factors
    aug = np.empty((len(other), k + 1), dtype=other.dtype)
    aug[:, :k] = other[:, :k]
    aug[:, k] = 1.0
    return aug, np.asarray(other[:, k], np.float64)


def initial_matrix(factors: np.ndarray, params: WalsParams) -> np.ndarray:
    """Stored initial factors (float32) from today's per-ID N(0, 1) draws: unchanged
    for wals; scaled by 1/sqrt(k) (unit expected norm, as Spark and `implicit` start
    small) and with a zero bias column where the mode has one."""
    return get_model(params.model).initial_matrix(np.asarray(factors, np.float32), params)


def split_bias(matrix: np.ndarray, params: WalsParams
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """(k factors, bias or None) of a stored factor matrix."""
    if not has_bias(params):
        return matrix, None
    k = params.latent_factors
    return np.ascontiguousarray(matrix[:, :k]), np.ascontiguousarray(matrix[:, k])


def predict(rows: np.ndarray, cols: np.ndarray, row_matrix: np.ndarray,
            col_matrix: np.ndarray, params: WalsParams, global_mean: float = 0.0,
            clip: tuple[float, float] | None = None) -> np.ndarray:
    """Predicted ratings (float64) of the given pairs from stored factor matrices:
    u_i · v_j, plus μ + b_i + c_j for explicit, clipped to `clip` if given."""
    u = np.asarray(row_matrix, np.float64)
    v = np.asarray(col_matrix, np.float64)
    k = params.latent_factors
    pred = np.einsum('ij,ij->i', np.take(u[:, :k], rows, axis=0),
                     np.take(v[:, :k], cols, axis=0))     # np.take: see _FactorTable
    if has_bias(params):
        pred += global_mean + u[rows, k] + v[cols, k]
    if clip is not None:
        np.clip(pred, clip[0], clip[1], out=pred)
    return pred


def predicted_squared_error(rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
                            row_matrix: np.ndarray, col_matrix: np.ndarray,
                            params: WalsParams, global_mean: float = 0.0,
                            clip: tuple[float, float] | None = None) -> float:
    """Σ (values - predict(...))² of the given pairs, in float64, in a fixed order
    (slice by slice on the kernel's threads: the same bits for any thread count)."""
    u = np.asarray(row_matrix, np.float64)
    v = np.asarray(col_matrix, np.float64)
    rows, cols = np.asarray(rows), np.asarray(cols)
    return sliced_squared_error(
        values, lambda s: predict(rows[s], cols[s], u, v, params, global_mean, clip))


def objective(by_row: Csr, col_counts: np.ndarray, row_matrix: np.ndarray,
              col_matrix: np.ndarray, params: WalsParams, global_mean: float = 0.0) -> float:
    """The loss the mode minimizes, regularization included (float64), for the
    training ratings `by_row` (all rows) and stored factor matrices."""
    p = params
    u = np.asarray(row_matrix, np.float64)
    v = np.asarray(col_matrix, np.float64)
    rows = by_row.row_of_entry()
    cols = np.asarray(by_row.indices, np.int64)
    a = np.asarray(by_row.values, np.float64)
    k = p.latent_factors
    dot = np.einsum('ij,ij->i', u[rows, :k], v[cols, :k])
    n_row = np.diff(by_row.indptr).astype(np.float64)
    n_col = np.bincount(cols, minlength=len(v)).astype(np.float64)
    if counts_scale_regularization(p):
        reg = p.regularization * (n_row @ np.sum(u * u, axis=1) + n_col @ np.sum(v * v, axis=1))
    else:
        reg = p.regularization * (np.sum(u * u) + np.sum(v * v))
    return get_model(p.model).objective(p, u, v, rows, cols, a, dot, reg, global_mean,
                                        by_row, col_counts)


# Entries per slice of block_objective: the gathered factor rows stay in cache.
_SLICE = 1 << 16


class ObjectiveTerms:
    """What block_objective needs of one block's training ratings besides the factors,
    slice by slice of its entries (`entries`): each slice's rows and per-entry weights
    (the wals mode's w0 + R_i C_j, looked up in a per-column table made here; the
    implicit mode's confidence alpha·g(|r|)) are worked out when the slice is
    evaluated, on the kernel's threads, into small temporaries. So a block's
    objective needs no memory beyond its own arrays: kept whole for every block,
    they cost 12 bytes per rating (0.3 GiB at 20M ratings) to save one elementwise
    pass per iteration."""

    def __init__(self, train: Csr, params: WalsParams, col_counts: np.ndarray):
        self.params = params
        self.num_rows = train.num_rows
        self.indptr = np.asarray(train.indptr)
        self.cols = np.asarray(train.indices)
        self.values = np.asarray(train.values, np.float64)
        self.table = get_model(params.model).weight_table(params, col_counts)

    @property
    def nnz(self) -> int:
        return len(self.values)

    def entries(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray | None]:
        """(row, column, value, weight or None) of the entries lo..hi-1 (CSR order)."""
        p = self.params
        rows = rows_of_entries(self.indptr, lo, hi)
        cols, values = self.cols[lo:hi], self.values[lo:hi]
        weight = get_model(p.model).entry_weights(p, cols, values, self.table)
        return rows, cols, values, weight


def rows_of_entries(indptr: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The row of each CSR entry lo..hi-1 (what np.repeat(rows, counts)[lo:hi] gives,
    without making it for every entry)."""
    first = int(np.searchsorted(indptr, lo, 'right')) - 1
    last = int(np.searchsorted(indptr, hi, 'left'))      # rows r with indptr[r] < hi
    counts = np.diff(np.clip(indptr[first:last + 1], lo, hi))
    dtype = np.int32 if len(indptr) <= 2 ** 31 else np.int64
    return np.repeat(np.arange(first, last, dtype=dtype), counts)


def block_objective(train: Csr, start: int, row_matrix: np.ndarray, col_matrix: np.ndarray,
                    params: WalsParams, col_counts: np.ndarray,
                    global_mean: float = 0.0,
                    terms: ObjectiveTerms | None = None) -> tuple[float, float]:
    """One row block's share of the objective, and its training squared error.

    train: the block's training ratings (rows start at `start`); row_matrix and
    col_matrix: the whole stored matrices. Summed over blocks and added to
    global_objective this is `objective` (the terms over all pairs come from the
    Gramians, so no block ever forms a dense matrix). The squared error is against
    the mode's prediction (explicit unclipped; implicit against preferences).
    Entries are taken slice by slice (float32 products of the stored factors,
    float64 sums). terms: ObjectiveTerms(train, params, col_counts), kept by the
    caller to evaluate the same block every iteration without redoing them (the
    result is the same, bit for bit)."""
    p = params
    if terms is None:
        terms = ObjectiveTerms(train, p, col_counts)
    elif terms.params != p or terms.num_rows != train.num_rows:
        raise ValueError('terms were made for other parameters or another block')
    n = train.num_rows
    u = row_matrix[start:start + n]
    own, other = _FactorTable(u, p), _FactorTable(col_matrix, p)

    def one(lo: int) -> tuple[float, float]:
        rows, cols, values, weight = terms.entries(lo, min(lo + _SLICE, terms.nnz))
        return _slice_terms(rows, cols, values, own, other, p, global_mean, weight)

    # Slices on the solver's threads, summed in slice order afterwards: the same bits
    # for any number of threads.
    parts = map_slices(one, terms.nnz, _SLICE)
    total = sse = 0.0
    for t, e in parts:
        total += t
        sse += e
    u64 = np.asarray(u, np.float64)
    if counts_scale_regularization(p):
        n_row = np.diff(train.indptr).astype(np.float64)
        total += p.regularization * fixed_dot(n_row, np.sum(u64 * u64, axis=1))
    else:
        total += p.regularization * float(np.sum(u64 * u64))
    return total, sse


class _FactorTable:
    """A stored matrix as block_objective's slices gather it: the k factor columns
    contiguous (float32) and, with a bias, the bias column as float64, split once
    per block rather than cut out of every gathered row (the same values; a
    contiguous product runs 1.5x as fast as one over k of k + 1 columns)."""

    def __init__(self, matrix: np.ndarray, p: WalsParams):
        k = p.latent_factors
        if has_bias(p):
            self.factors = np.ascontiguousarray(matrix[:, :k])
            self.bias = np.asarray(matrix[:, k], np.float64)
        else:
            self.factors, self.bias = matrix, None

    def gather(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # np.take: the same rows as fancy indexing, 3-6x faster for rows of a few
        # dozen floats.
        bias = None if self.bias is None else np.take(self.bias, index)
        return np.take(self.factors, index, axis=0), bias


def _slice_terms(rows, cols, a, own: _FactorTable, other: _FactorTable, p: WalsParams,
                 global_mean: float, weight) -> tuple[float, float]:
    """(objective terms, squared error) of one slice of a block's entries; weight:
    its per-entry weights (ObjectiveTerms.entries)."""
    # float32 gathers and products (the stored factors' own precision; 3-4x less
    # memory traffic than float64 copies), summed in float64.
    ur, ub = own.gather(rows)
    vc, vb = other.gather(cols)
    dot = np.einsum('ij,ij->i', ur, vc).astype(np.float64)
    return get_model(p.model).slice_terms(p, a, dot, ub, vb, global_mean, weight)


def count_norm(counts: np.ndarray, matrix: np.ndarray) -> float:
    """Σ_j n_j ||v_j||² (float64) of some rows of a stored matrix and their training
    counts: the count-scaled regularization of those rows. Summed over column
    blocks in block order it is the same number for any exchange (a fixed-order
    sum: the same for any BLAS thread count, too)."""
    v = np.asarray(matrix, np.float64)
    return fixed_dot(counts, np.sum(v * v, axis=1))


def global_objective(row_gramian: np.ndarray, col_gramian: np.ndarray,
                     params: WalsParams, col_count_norm: float) -> float:
    """The objective's terms that are not per row block: the unobserved pairs
    (w0 Σ_all (u_i·v_j)² = w0 sum(UᵀU ∘ VᵀV)) and the column regularization
    (col_count_norm: count_norm of every column, used when λ is count-scaled)."""
    p = params
    if counts_scale_regularization(p):
        reg = p.regularization * float(col_count_norm)
    else:
        reg = p.regularization * float(np.trace(np.asarray(col_gramian)))
    return get_model(p.model).global_terms(p, row_gramian, col_gramian, reg)

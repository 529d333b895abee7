"""In-memory trainer (the numpy reference, no Beam): the same kernel as the Beam
pipeline, on one array. pipeline/cli/train.py is the command line that runs the Beam
job; this module trains small data in one process (tests, the tuner).

Factors are stored in float32 between half-steps, exactly as the pipeline does.
Every mode of wals_core/objectives.py is supported; for `explicit` the stored
matrices carry the bias as their last column (see objectives.split_bias).
With params.solver 'cg' every half-step runs params.cg_steps conjugate-gradient
steps per row, warm-started from that side's factors of the previous iteration; the
first iteration starts from 0 (random initial factors are no better a start than 0,
and ALS never uses the row side's).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import numpy as np

from wals_core import objectives
from wals_core.init import initial_factors
from wals_core.params import WalsParams
from wals_core.solve import gramian
from wals_core.sparse import Csr, csr_from_triples
from wals_core.weights import column_weights, row_weights

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Problem:
    """Training ratings as CSR by rows and by columns, with their WALS weights."""
    by_row: Csr
    by_col: Csr
    row_wts: np.ndarray
    col_wts: np.ndarray
    col_counts: np.ndarray = None      # training ratings per column
    global_mean: float = 0.0           # mean training rating (the explicit mode's μ)
    # One RowSolver per (side, parameters), made on first use: iterations reuse its plan.
    _solvers: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                       compare=False)

    @classmethod
    def build(cls, rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
              num_rows: int, num_cols: int, params: WalsParams) -> 'Problem':
        """From duplicate-free training triples (row index, col index, value)."""
        counts = np.bincount(np.asarray(cols, np.int64), minlength=num_cols)
        values = np.asarray(values, np.float64)
        return cls(by_row=csr_from_triples(rows, cols, values, num_rows),
                   by_col=csr_from_triples(cols, rows, values, num_cols),
                   row_wts=row_weights(num_rows, params),
                   col_wts=column_weights(counts, params),
                   col_counts=counts,
                   global_mean=float(values.mean()) if len(values) else 0.0)


def solve_side(problem: Problem, side: str, other: np.ndarray,
               params: WalsParams, own: np.ndarray | None = None) -> np.ndarray:
    """One half-step for all rows ('row') or all columns ('col') against the other
    side's stored factor matrix; returns the stored matrix of this side (float32).
    own: this side's current stored matrix, where the CG solver starts (ignored by
    the exact solver; None: from 0)."""
    p = dataclasses.replace(params, num_iters=0)     # iterations do not change a solve
    key = (side, p)
    solver = problem._solvers.get(key)
    if solver is None:
        if side == 'row':
            block, other_rows = problem.by_row, problem.by_col.num_rows
        else:
            block, other_rows = problem.by_col, problem.by_row.num_rows
        solver = problem._solvers[key] = objectives.make_solver(
            block, side, params, problem.col_counts, 0, other_rows, problem.global_mean)
    factors, offsets = objectives.solve_inputs(np.asarray(other), params)
    x0 = own if params.solver == 'cg' else None
    return solver.solve(factors, gramian(other), other_offsets=offsets,
                        x0=x0).astype(np.float32)


def initial_state(row_init: np.ndarray, col_init: np.ndarray, params: WalsParams
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Stored initial matrices from per-ID N(0, 1) draws (objectives.initial_matrix)."""
    return (objectives.initial_matrix(row_init, params),
            objectives.initial_matrix(col_init, params))


def train(problem: Problem, params: WalsParams, row_init: np.ndarray,
          col_init: np.ndarray,
          on_half_step: Callable[[int, str, np.ndarray, np.ndarray], None] | None = None,
          ) -> tuple[np.ndarray, np.ndarray]:
    """num_iters × (all rows, then all columns); returns float32 (U, V)."""
    u = np.asarray(row_init, np.float32)
    v = np.asarray(col_init, np.float32)
    for it in range(params.num_iters):
        u = solve_side(problem, 'row', v, params, own=u if it else None)
        if on_half_step:
            on_half_step(it, 'row', u, v)
        v = solve_side(problem, 'col', u, params, own=v if it else None)
        if on_half_step:
            on_half_step(it, 'col', u, v)
    return u, v


def fit_inputs(rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
               row_hashes: np.ndarray, col_hashes: np.ndarray, params: WalsParams,
               seed: int = 0) -> tuple[Problem, np.ndarray, np.ndarray]:
    """What an in-memory fit starts from, as the pipeline makes it: the Problem of
    duplicate-free training triples (dense row / column indices) and the stored
    initial matrices, each ID's vector from its stable hash and the seed (the same
    on any runner). row_hashes / col_hashes: id_hashes of every row's and column's
    ID in index order (their lengths are the matrix's shape). Returns (problem, U0,
    V0)."""
    problem = Problem.build(rows, cols, values, len(row_hashes), len(col_hashes), params)
    k = params.latent_factors
    u0, v0 = initial_state(initial_factors(row_hashes, k, seed, 'row'),
                           initial_factors(col_hashes, k, seed, 'col'), params)
    return problem, u0, v0


def fit(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, row_hashes: np.ndarray,
        col_hashes: np.ndarray, params: WalsParams, seed: int = 0,
        on_half_step: Callable[[int, str, np.ndarray, np.ndarray], None] | None = None,
        ) -> tuple[Problem, np.ndarray, np.ndarray]:
    """The in-memory fit (tests, the tuner, the benchmarks): fit_inputs, then
    params.num_iters iterations. Returns (problem, U, V), float32 stored matrices
    (explicit: bias as the last column)."""
    problem, u0, v0 = fit_inputs(rows, cols, values, row_hashes, col_hashes, params, seed)
    u, v = train(problem, params, u0, v0, on_half_step)
    return problem, u, v


def loss(problem: Problem, params: WalsParams, u: np.ndarray, v: np.ndarray) -> float:
    """The WALS objective (float64):
    Σ_obs (w0 + R_i C_j)(A_ij - u_i·v_j)² + w0 Σ_unobs (u_i·v_j)² + λ(|U|² + |V|²).
    Uses Σ_all (u_i·v_j)² = sum(UᵀU ∘ VᵀV) so no dense matrix is formed."""
    u64, v64 = np.asarray(u, np.float64), np.asarray(v, np.float64)
    w0 = params.unobs_weight
    rows = problem.by_row.row_of_entry()
    cols = problem.by_row.indices
    a = problem.by_row.values
    pred = np.einsum('ij,ij->i', u64[rows], v64[cols])
    conf = problem.row_wts[rows] * problem.col_wts[cols]
    observed = np.sum((w0 + conf) * (a - pred) ** 2)
    unobserved = w0 * (np.sum(gramian(u64) * gramian(v64)) - np.sum(pred ** 2))
    return float(observed + unobserved
                 + params.regularization * (np.sum(u64 ** 2) + np.sum(v64 ** 2)))

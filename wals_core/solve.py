"""The WALS half-step: solve every row of a block against the other side's factors.

For row i with observed columns j, other factors v_j, Gramian G = VᵀV:
    (w0*G + λI + Σ_j R_i*C_j v_j v_jᵀ) u_i = Σ_j (w0 + R_i*C_j) A_ij v_j

How the exact solver computes it (all in float64: no float32 accumulation, results
agree with a dense per-row np.linalg.solve to rounding, ~1e-13 relative)
--------------------------------------------------------------------------------
* Per-row Gramians by BLAS-3. With x_j = sqrt(C_j) v_j (one scaled float64 copy of
  the other side per call), Σ_j R_i C_j v_j v_jᵀ = R_i XᵀX, X stacking the x_j of
  the row's entries. Rows are sorted by entry count and grouped into chunks of
  similar length (within _LENGTH_RATIOS; shorter rows padded with a zero row). A
  chunk is processed in batches of rows whose arrays stay in cache: gather X as a
  (rows × length × k) array and get every XᵀX from one batched matmul (numpy hands
  A.T @ A to BLAS syrk; a very long row is cut into pieces that are summed). The
  right-hand sides come from the same X (a batched matvec), since for C_j > 0
  (w0 + R_i C_j) A_ij v_j = A_ij (w0 / sqrt(C_j) + R_i sqrt(C_j)) x_j; entries with
  C_j <= 0 are added from v_j itself.
* Batched solve through numpy's LAPACK gufuncs. When R, C >= 0 every matrix is
  w0*G + λI plus a PSD part, so if the smallest eigenvalue of w0*G + λI is not tiny
  next to the batch's largest diagonal element (_SAFE_RTOL) no row can be singular:
  one batched LU solve (gesv). Otherwise batched Cholesky (potrf), substitutions
  vectorized over the batch, and a row whose factorization fails or has a pivot²
  below _PIVOT_RTOL × its largest diagonal element (singular or numerically so,
  e.g. λ = w0 = 0 with fewer ratings than factors) gets the pseudo-inverse
  (minimum-norm least-squares) answer from an eigendecomposition, eigenvalues below
  _PINV_RTOL × the largest counted as zero. Other rows are not affected: never NaN
  (unless the row's inputs are: a NaN rating or factor stays visible in its row),
  never a failed batch.
* Solved again every iteration (RowSolver): what the factors do not change is
  planned once per block, on the first solve, and kept: the row chunks, and per
  batch the padded gather indices and the right-hand-side weights of every entry
  (about 16 bytes per rating). An iteration then only gathers, multiplies and
  solves. `solve_rows` is the one-call form (the plan is dropped afterwards).
* A row without entries gets 0. When no entry of a batch has R_i*C_j != 0 (weights
  off), its rows share the matrix w0*G + λI: factorized once per call.
* Chunks are spread over `num_threads` Python threads (numpy's take/matmul and the
  LAPACK gufuncs release the GIL). OpenBLAS's own threading is slow for these many
  small products (and pathological on a busy machine: spinning threads), so during
  the call numpy's OpenBLAS runs on one thread (reference counted; the previous
  setting is restored afterwards). Results do not depend on the number of threads.

Generalizations used by the other objectives (wals_core/objectives.py), all on the
same path: per-entry weights E_ij >= 0 (an observed entry weighs w0 + R_i C_j E_ij:
the gathered x_j are scaled by sqrt(E_ij) before the Gramian product), a per-row
regularization λ_i instead of one λ (ALS-WR's λ·n_i), and per-column offsets o_j
given with each solve (the target becomes A_ij - o_j: the other side's bias). With
none of them the code path is exactly the original one.

Conjugate-gradient solver (`solver='cg'`, wals_core/cg.py): `cg_steps` CG
iterations per row (default 3, as the `implicit` library), warm-started from `x0`
(the rows' previous factors), applying each row's matrix through its entries and the
shared w0*G + λI without forming it; for every generalization above (entry weights,
per-row λ_i, offsets). APPROXIMATE (float32 products, about 1e-6 relative at best;
exact in exact arithmetic after k steps); 3 steps take 7-8·k multiply-adds per
rating against the exact Gramian's k²/2 (2x fewer at k = 32, none at k = 16), as
BLAS-2 products. The exact solver stays the default. Its per-row results, too, do
not depend on threads or batching.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from threadpoolctl import ThreadpoolController

from wals_core import cg
from wals_core.sparse import Csr

T = TypeVar('T')

# Scheduling unit (chunk) of the thread pool: at most _CHUNK_ENTRIES padded entries
# (unless one row alone has more) and _CHUNK_ELEMENTS / k² rows, lengths within
# _LENGTH_RATIO of each other (padding waste <= 6%) ...
_CHUNK_ELEMENTS = 1 << 21
_CHUNK_ENTRIES = 1 << 19
_LENGTH_RATIO = 1.0625
# ... widened step by step (up to 1.5) while a chunk has fewer padded entries than this.
_LENGTH_RATIOS = (_LENGTH_RATIO, 1.125, 1.25, 1.5)
_MIN_CHUNK_ENTRIES = 1 << 15
# Rows whose k × k matrices (rows × k² elements; 1 MiB) are built and solved together.
_BATCH_ELEMENTS = 1 << 17
# Elements of one gathered (rows × length × k) piece: 2^17 float64 = 1 MiB (cache).
_PIECE_ELEMENTS = 1 << 17
# A Cholesky pivot² below this × the row's largest diagonal element means "singular".
_PIVOT_RTOL = 1e-10
# Pseudo-inverse cutoff (relative to the largest |eigenvalue|) for those rows.
_PINV_RTOL = 1e-10
# A batch whose matrices are all known to have condition number below
# 1 / (_SAFE_RTOL × k) is solved by LU without per-row checks.
_SAFE_RTOL = 1e-9


def gramian(factors: np.ndarray) -> np.ndarray:
    """VᵀV in float64."""
    f = np.asarray(factors, dtype=np.float64)
    with single_threaded_blas():
        return f.T @ f


def solve_rows(block: Csr, self_weights: np.ndarray, other_factors: np.ndarray,
               other_weights: np.ndarray, other_gramian: np.ndarray,
               unobs_weight: float, regularization: float, *,
               solver: str = 'exact', x0: np.ndarray | None = None, cg_steps: int = 3,
               num_threads: int | None = None) -> np.ndarray:
    """Minimizer for every row of `block` (float64, block.num_rows × k).

    self_weights: R (or C) of the block's rows; other_weights: C (or R) of every
    row of the other side; other_gramian: VᵀV over the whole other side.
    A row with no entries gets the exact minimizer of its regularized problem: 0.
    A singular system gets its least-squares (minimum-norm, pseudo-inverse) answer.

    solver: 'exact' (default) or 'cg': APPROXIMATE, `cg_steps` conjugate-gradient
    steps per row starting from `x0` (block.num_rows × k, any float dtype; zeros if
    None); see wals_core/cg.py.
    num_threads: worker threads (default: the CPUs this process may run on).

    One call; to solve the same block in every iteration, keep a RowSolver.
    """
    factors = np.asarray(other_factors)
    k = factors.shape[1] if factors.ndim == 2 else 0
    return RowSolver(block, self_weights, other_weights, unobs_weight, regularization, k,
                     num_threads=num_threads, keep_plan=False).solve(
        factors, other_gramian, solver=solver, x0=x0, cg_steps=cg_steps)


def _check_solver(solver: str, cg_steps: int) -> tuple[str, int]:
    if solver not in ('exact', 'cg'):
        raise ValueError(f"solver must be 'exact' or 'cg', got {solver!r}")
    if isinstance(cg_steps, bool) or int(cg_steps) != cg_steps or cg_steps < 0:
        raise ValueError(f'cg_steps must be an integer >= 0, got {cg_steps!r}')
    return solver, int(cg_steps)


def default_threads() -> int:
    """Worker threads of a kernel by default: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def map_slices(fn: Callable[[int], T], total: int, step: int) -> list[T]:
    """[fn(0), fn(step), fn(2·step), ...] over range(0, total, step), run on
    default_threads() threads with numpy's BLAS on one (numpy's gathers and products
    release the GIL), returned in slice order: a caller that combines them in that
    order gets the same bits for any number of threads."""
    starts = range(0, total, step)
    threads = min(default_threads(), len(starts))
    with single_threaded_blas():     # many small products: OpenBLAS threads only cost
        if threads <= 1:
            return [fn(lo) for lo in starts]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(fn, starts))


@dataclasses.dataclass
class _Batch:
    """The iteration-invariant inputs of one batch of rows (RowSolver._plan_batch)."""
    rows: np.ndarray               # row numbers in the block
    pieces: list                   # gather pieces (see _batches)
    cols: np.ndarray               # (rows × length) column ids (weighted: padding -> m)
    y: np.ndarray | None           # right-hand-side weight on x_j per entry (weighted)
    r: np.ndarray | None           # R_i, when not all 1 (weighted)
    w: np.ndarray | None           # w0 * A_ij, padding 0 (weights off)
    general: tuple | None = None   # (cols, vals, pad, r, s) when some C_j <= 0
    s: np.ndarray | None = None    # sqrt(E_ij) per entry, padding 0 (entry weights)
    f: np.ndarray | None = None    # rhs factor per entry: y (or w) is A_ij * f (offsets)

    @property
    def nbytes(self) -> int:
        arrays = [self.cols, self.y, self.r, self.w, self.s, self.f] + list(self.general or ())
        unique = {id(a): a for a in arrays if isinstance(a, np.ndarray)}  # cols is shared
        return sum(a.nbytes for a in unique.values())


class RowSolver:
    """Solves the rows of one block again and again, once per iteration, against the
    other side's changing factors.

    What does not change between iterations is worked out once: the grouping of rows
    by entry count (chunks), and per batch of rows the gather indices and per-entry
    weights (the plan, made on the first exact solve; about 16 bytes per rating).
    self_weights: R (or C) of the block's rows; other_weights: C (or R) of every row
    of the other side (its length is the other side's row count); num_factors: k.
    keep_plan: False to drop the plan after each solve (for a single call).
    other_signs: see __init__ (routed exchange: other_weights of the needed rows only).
    solver, cg_steps: what `solve` does when not told otherwise: 'exact' (default) or
    'cg' with cg_steps conjugate-gradient steps per row (wals_core/cg.py; give each
    solve the rows' previous factors as x0 to warm-start it). The CG plan (about 12
    bytes per padded rating at most) is made on the first CG solve.
    """

    def __init__(self, block: Csr, self_weights: np.ndarray, other_weights: np.ndarray,
                 unobs_weight: float, regularization: float, num_factors: int, *,
                 entry_weights: np.ndarray | None = None,
                 row_regularization: np.ndarray | None = None, offsets: bool = False,
                 other_signs: tuple[bool, bool] | None = None,
                 num_threads: int | None = None, keep_plan: bool = True,
                 solver: str = 'exact', cg_steps: int = 3):
        self.solver, self.cg_steps = _check_solver(solver, cg_steps)
        self.indptr = np.asarray(block.indptr, dtype=np.int64)
        self.indices = np.asarray(block.indices)
        self.values = np.asarray(block.values, dtype=np.float64)
        self.n = len(self.indptr) - 1
        self.own = np.asarray(self_weights, dtype=np.float64)
        self.other = np.asarray(other_weights, dtype=np.float64)
        self.m = len(self.other)
        self.k = int(num_factors)
        self.w0 = float(unobs_weight)
        self.regularization = float(regularization)
        if len(self.own) != self.n:
            raise ValueError(f'{len(self.own)} self weights for {self.n} rows')
        self.entry = None
        if entry_weights is not None:
            self.entry = np.asarray(entry_weights, dtype=np.float64)
            if self.entry.shape != self.values.shape:
                raise ValueError(f'{len(self.entry)} entry weights for {len(self.values)} entries')
            if not np.all(self.entry >= 0):
                raise ValueError('entry weights must be finite and >= 0')
            self.entry_sqrt = np.sqrt(self.entry)
        self.row_reg = None
        if row_regularization is not None:
            self.row_reg = np.asarray(row_regularization, dtype=np.float64)
            if self.row_reg.shape != (self.n,):
                raise ValueError(f'{len(self.row_reg)} row regularizations for {self.n} rows')
        self.offsets = bool(offsets)
        # Gathers below clip indices (no bounds checks): check them once here.
        if len(self.indices) and (int(self.indices.min()) < 0
                                  or int(self.indices.max()) >= self.m):
            raise IndexError(f'column index out of range for {self.m} rows of other factors')
        c = self.other
        # other_signs: (all C_j > 0, any C_j < 0) of the whole other side when
        # other_weights holds only the rows the block refers to (a routed exchange):
        # the same flags pick the same code path, so the answers are bit-identical.
        self.all_pos, self.any_neg = (bool(np.all(c > 0)), bool(np.any(c < 0))) \
            if other_signs is None else (bool(other_signs[0]), bool(other_signs[1]))
        self.sq = np.sqrt(np.where(c > 0, c, 0.0))
        self.w0_inv = np.divide(self.w0, self.sq, out=np.zeros_like(self.sq),
                                where=c > 0)
        self.col_w = self.w0_inv + self.sq
        self.row_safe = bool(np.all(self.own >= 0))
        self.threads = default_threads() if num_threads is None else max(1, int(num_threads))
        self.keep_plan = keep_plan
        self.chunks = self._chunks() if self.k and self.n else []
        self._plan: list[list[_Batch] | None] = [None] * len(self.chunks)
        self._plan_bytes = 0          # kept up to date as chunks are planned
        self._plan_lock = threading.Lock()
        self._cg_plan: list[cg.CgBatch] | None = None
        self._cg_bytes = 0

    @property
    def plan_nbytes(self) -> int:
        """Memory held by the plans (0 until the first solve)."""
        return self._plan_bytes + self._cg_bytes

    def solve(self, other_factors: np.ndarray, other_gramian: np.ndarray, *,
              other_offsets: np.ndarray | None = None,
              solver: str | None = None, x0: np.ndarray | None = None,
              cg_steps: int | None = None) -> np.ndarray:
        """Minimizer for every row (float64, n × k) given the other side's factors
        (m × k) and their Gramian VᵀV; see solve_rows. other_offsets (m,): o_j,
        subtracted from every target A_ij (needs a solver made with offsets=True).
        solver, cg_steps: this call's (default: the RowSolver's); x0 (n × k, any
        float dtype, e.g. the block's stored float32 factors of the previous
        iteration): where CG starts (None: 0); the exact solver ignores it."""
        solver, cg_steps = _check_solver(self.solver if solver is None else solver,
                                         self.cg_steps if cg_steps is None else cg_steps)
        if other_offsets is not None and not self.offsets:
            raise ValueError('other_offsets needs a RowSolver made with offsets=True')
        factors = np.asarray(other_factors)
        if factors.shape != (self.m, self.k):
            raise ValueError(f'other factors must have shape {(self.m, self.k)}, '
                             f'got {factors.shape}')
        start = None
        if solver == 'cg' and x0 is not None:
            start = np.asarray(x0)
            if start.shape != (self.n, self.k):
                raise ValueError(f'x0 must have shape {(self.n, self.k)}, got {start.shape}')
        call = _Call(self, factors, other_gramian, other_offsets)
        out = np.zeros((self.n, self.k), dtype=np.float64)
        if not self.chunks:
            return out
        if solver == 'cg':
            return self._solve_cg(call, factors, start, cg_steps, out)
        else:
            def work(i):
                batches = self._plan[i]
                if batches is None:
                    batches = self._plan_chunk(*self.chunks[i])
                    if self.keep_plan:
                        with self._plan_lock:
                            if self._plan[i] is None:
                                self._plan[i] = batches
                                self._plan_bytes += sum(b.nbytes for b in batches)
                for b in batches:
                    out[b.rows] = call.exact_batch(b)

        threads = min(self.threads, len(self.chunks))
        with single_threaded_blas():
            if threads <= 1:
                for i in range(len(self.chunks)):
                    work(i)
            else:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    # Biggest chunks first, so the last ones to finish are small.
                    order = sorted(range(len(self.chunks)), key=lambda i: -len(
                        self.chunks[i][0]) * (self.chunks[i][1] + self.k))
                    for f in [pool.submit(work, i) for i in order]:
                        f.result()
        return out

    def _solve_cg(self, call: '_Call', factors: np.ndarray, start: np.ndarray | None,
                  steps: int, out: np.ndarray) -> np.ndarray:
        """CG for every row with entries (wals_core/cg.py); rows without stay 0."""
        batches = self._cg_plan
        if batches is None:
            batches = cg.plan(self)
            if self.keep_plan:
                self._cg_plan = batches
                self._cg_bytes = sum(b.nbytes for b in batches)
        inputs = cg.Inputs(factors, call.base, call.offsets)

        def work(b: cg.CgBatch):
            out[b.rows] = cg.solve_batch(b, inputs, None if start is None else start[b.rows],
                                         steps)

        threads = min(self.threads, len(batches))
        with single_threaded_blas():
            if threads <= 1:
                for b in batches:
                    work(b)
            else:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    order = sorted(batches, key=lambda b: -b.cols.size)   # biggest first
                    for f in [pool.submit(work, b) for b in order]:
                        f.result()
        return out

    # -- chunking ---------------------------------------------------------------------

    def _chunks(self) -> list[tuple[np.ndarray, int]]:
        """(rows, padded length): rows with entries, sorted by entry count, cut into
        groups whose lengths are within _LENGTH_RATIOS, at most _CHUNK_ENTRIES padded
        entries (unless one row alone has more) and _CHUNK_ELEMENTS / k² rows."""
        lens = np.diff(self.indptr)
        order = np.argsort(lens, kind='stable')
        order = order[lens[order] > 0]
        sorted_lens = lens[order]
        max_rows = max(1, _CHUNK_ELEMENTS // (self.k * self.k))
        out = []
        start, total = 0, len(order)
        while start < total:
            lo = int(sorted_lens[start])
            # Lengths within _LENGTH_RATIO; where rows are few (small blocks, the long
            # tail), accept more padding rather than many tiny chunks.
            for ratio in _LENGTH_RATIOS:
                stop = int(np.searchsorted(sorted_lens, lo * ratio, side='right'))
                if (stop - start) * int(sorted_lens[stop - 1]) >= _MIN_CHUNK_ENTRIES:
                    break
            stop = min(stop, start + max_rows)
            # Rows [start, stop) are padded to the longest: cap the padded entries.
            length = int(sorted_lens[stop - 1])
            if (stop - start) * length > _CHUNK_ENTRIES:
                stop = start + max(1, _CHUNK_ENTRIES // length)
                length = int(sorted_lens[stop - 1])
            out.append((np.sort(order[start:stop]), length))
            start = stop
        return out

    def entries(self, rows: np.ndarray, length: int):
        """The rows' entries as (rows × length) arrays: column ids (intp; padding
        repeats a row's last entry), values (NOT zeroed at padding) and the padding
        mask (None without padding). See entry_scale for sqrt(E_ij)."""
        starts = self.indptr[rows]
        lens = self.indptr[rows + 1] - starts
        pos = np.add.outer(starts, np.arange(length))
        pad = None
        if int(lens.min()) < length:
            last = starts + lens - 1
            pad = pos > last[:, None]
            np.minimum(pos, last[:, None], out=pos)
        cols = np.take(self.indices, pos, mode='clip').astype(np.intp, copy=False)
        vals = np.take(self.values, pos, mode='clip')
        return cols, vals, pad

    def entry_scale(self, rows: np.ndarray, length: int,
                    pad: np.ndarray | None) -> np.ndarray | None:
        """sqrt(E_ij) of the rows' entries (rows × length, 0 at padding), or None
        without entry weights."""
        if self.entry is None:
            return None
        starts = self.indptr[rows]
        pos = np.add.outer(starts, np.arange(length))
        s = np.take(self.entry_sqrt, pos, mode='clip')
        if pad is not None:
            s[pad] = 0.0
        return s

    def _plan_chunk(self, rows: np.ndarray, length: int) -> list[_Batch]:
        """A chunk's batches of rows whose arrays stay in cache, with everything the
        exact solve of each needs that the factors do not change."""
        return [self._plan_batch(rows[rs], length, pieces)
                for rs, pieces in _batches(len(rows), length, self.k)]

    def _plan_batch(self, rows: np.ndarray, length: int, pieces) -> _Batch:
        cols, vals, pad = self.entries(rows, length)
        r = self.own[rows]
        s = self.entry_scale(rows, length, pad)
        # An entry with E_ij = 0 but a target and w0 != 0 cannot be reached through
        # sqrt(E_ij) x_j: such batches take the general path.
        # (Padding has s = 0 and the row's last value repeated: it gathers the zero row,
        # so it never counts as unreachable.)
        unreachable = s is not None and self.w0 != 0 and bool(np.any(
            (s == 0) & (vals != 0) & (True if pad is None else ~pad)))
        if not self.all_pos or unreachable:
            return _Batch(rows, pieces, cols, None, None, None, general=(cols, vals, pad, r, s))
        if not np.any(r) and self.row_reg is None:
            # No observation weights: every row's matrix is w0*G + λI.
            w = self.unweighted_rhs(vals, pad)
            f = self.unweighted_rhs(np.ones_like(vals), pad) if self.offsets else None
            return _Batch(rows, pieces, cols, None, None, w, f=f)
        ones = bool(np.all(r == 1.0))
        y = self.rhs_weights(cols, vals, None if ones else r, s)
        f = self.rhs_weights(cols, np.ones_like(vals), None if ones else r, s) \
            if self.offsets else None
        if pad is not None:
            cols[pad] = self.m              # m: the zero row
        return _Batch(rows, pieces, cols, y, None if ones else r, None, s=s, f=f)

    def unweighted_rhs(self, vals: np.ndarray, pad: np.ndarray | None) -> np.ndarray:
        """Weights off: w0 A_ij per entry (0 at padding), summed over v_j."""
        w = self.w0 * vals
        if pad is not None:
            w[pad] = 0.0
        return w

    def rhs_weights(self, cols: np.ndarray, vals: np.ndarray,
                    r: np.ndarray | None, s: np.ndarray | None = None) -> np.ndarray:
        """Right-hand-side weights on x_j = sqrt(C_j) v_j: A_ij (w0 / sqrt(C_j) +
        R_i sqrt(C_j)) (0 where C_j <= 0; padding values are irrelevant, as padding
        gathers the zero row). r None means every R_i is 1. With entry scales s =
        sqrt(E_ij) (x_j also scaled by s): A_ij (w0 / (sqrt(C_j) s) + R_i sqrt(C_j) s),
        0 where s = 0."""
        if s is not None:
            y = np.take(self.w0_inv, cols, mode='clip')
            np.divide(y, s, out=y, where=s > 0)
            y[s == 0] = 0.0
            t = np.take(self.sq, cols, mode='clip') * s
            if r is not None:
                t *= r[:, None]
            y += t
            y *= vals
            return y
        if r is None:
            y = np.take(self.col_w, cols, mode='clip')
        else:
            y = np.take(self.sq, cols, mode='clip')
            y *= r[:, None]
            y += np.take(self.w0_inv, cols, mode='clip')
        y *= vals
        return y


class _Call:
    """One solve's inputs that change every iteration: the other side's factors."""

    def __init__(self, solver: RowSolver, factors: np.ndarray, other_gramian: np.ndarray,
                 offsets: np.ndarray | None = None):
        self.s = solver
        self.factors = factors
        k = solver.k
        # With per-row λ_i the base is w0*G alone; λ_i goes on each row's diagonal.
        reg = 0.0 if solver.row_reg is not None else solver.regularization
        self.base = solver.w0 * np.asarray(other_gramian, dtype=np.float64) \
            + reg * np.eye(k)
        # o_j per column plus a 0 for the zero row m that padding gathers.
        self.offsets = None
        if solver.offsets:
            o = np.zeros(solver.m + 1)
            if offsets is not None:
                o[:-1] = np.asarray(offsets, dtype=np.float64).reshape(solver.m)
            self.offsets = o
        self._lock = threading.Lock()
        self._base_solver = None
        self._columns = None
        self._v = None

    @property
    def v(self) -> np.ndarray:
        """The other side's factors in float64 (made on first use: only the weights-off,
        C_j <= 0 and CG paths need them)."""
        with self._lock:
            if self._v is None:
                self._v = np.ascontiguousarray(self.factors, dtype=np.float64)
            return self._v

    def columns(self):
        """(computed once per call) x_j = sqrt(C_j) v_j (0 where C_j <= 0, plus a zero
        row m that padding entries gather), sqrt(-C_j) v_j (None if no C_j < 0), and
        the smallest eigenvalue of w0*G + λI."""
        with self._lock:
            if self._columns is None:
                s = self.s
                scaled = np.zeros((s.m + 1, s.k))
                np.multiply(self.factors, s.sq[:, None], out=scaled[:-1])
                neg = None
                if s.any_neg:
                    neg = np.zeros((s.m + 1, s.k))
                    np.multiply(self.factors, np.sqrt(np.maximum(-s.other, 0.0))[:, None],
                                out=neg[:-1])
                base_min = float(np.linalg.eigvalsh(self.base)[0]) if s.k else 0.0
                self._columns = (scaled, neg, base_min)
            return self._columns

    def base_solve(self, rhs: np.ndarray) -> np.ndarray:
        """(w0*G + λI)⁻¹ for the rows of rhs (n × k); pseudo-inverse if singular."""
        with self._lock:
            if self._base_solver is None:
                self._base_solver = _SharedSolver(self.base)
        return self._base_solver(rhs)

    # -- exact ------------------------------------------------------------------------

    def _shifted(self, y: np.ndarray, f: np.ndarray | None, cols: np.ndarray) -> np.ndarray:
        """Right-hand-side weights for targets A_ij - o_j: y - o_j f (f: y per unit A)."""
        if self.offsets is None:
            return y
        return y - np.take(self.offsets, cols, mode='clip') * f

    def exact_batch(self, b: _Batch) -> np.ndarray:
        if b.general is not None:
            return self._general_batch(b)
        if b.w is not None:
            return self.base_solve(_weighted_sums(self.v, b.cols, self._shifted(b.w, b.f, b.cols),
                                                  b.pieces))
        scaled, neg, base_min = self.columns()
        lhs, rhs = _gram_and_rhs(scaled, b.cols, self._shifted(b.y, b.f, b.cols), b.pieces, b.s)
        if neg is not None:
            lhs -= _gram_and_rhs(neg, b.cols, None, b.pieces, b.s)[0]
        if b.r is not None:
            lhs *= b.r[:, None, None]
        return self._finish(lhs, rhs, neg is None, base_min, b.rows)

    def _finish(self, lhs, rhs, no_neg: bool, base_min: float, rows: np.ndarray) -> np.ndarray:
        lhs += self.base
        if self.s.row_reg is not None:
            reg = self.s.row_reg[rows]
            k = self.s.k
            if lhs.flags.c_contiguous:      # through a view: no fancy-index round trip
                diagonals = lhs.reshape(len(lhs), k * k)[:, ::k + 1]
                diagonals += reg[:, None]
            else:
                lhs[:, np.arange(k), np.arange(k)] += reg[:, None]
            base_min += float(np.min(reg)) if len(reg) else 0.0
        # Every matrix is base + (PSD) when R, C >= 0: if base is well conditioned
        # relative to the largest diagonal element, no row can be (nearly) singular.
        safe = no_neg and self.s.row_safe and base_min > _SAFE_RTOL * self.s.k \
            * float(np.max(np.diagonal(lhs, axis1=1, axis2=2)))
        return _spd_solve(lhs, rhs, safe)

    def _general_batch(self, b: _Batch) -> np.ndarray:
        """Some C_j <= 0: weights from the entries themselves, recomputed every call."""
        s = self.s
        cols, vals, pad, r, es = b.general
        if self.offsets is not None:
            vals = vals - np.take(self.offsets, cols, mode='clip')
        c = np.take(s.other, cols, mode='clip')
        conf = r[:, None] * c
        if es is not None:
            conf *= es * es
        if pad is not None:
            conf[pad] = 0.0
        if not np.any(conf) and s.row_reg is None:
            return self.base_solve(_weighted_sums(self.v, cols, s.unweighted_rhs(vals, pad),
                                                  b.pieces))
        scaled, neg, base_min = self.columns()
        y = s.rhs_weights(cols, vals, r, es)
        gcols = cols if pad is None else np.where(pad, s.m, cols)   # m: the zero row
        lhs, rhs = _gram_and_rhs(scaled, gcols, y, b.pieces, es)
        if neg is not None:
            lhs -= _gram_and_rhs(neg, gcols, None, b.pieces, es)[0]
        lhs *= r[:, None, None]
        # Entries whose C_j <= 0 (or E_ij = 0) add (w0 + R_i C_j E_ij) A_ij v_j from
        # v itself.
        other = c <= 0
        if es is not None:
            other |= es == 0
        if pad is not None:
            other &= ~pad
        if np.any(other):
            i, j = np.nonzero(other)
            weight = vals[i, j] * (s.w0 + conf[i, j])
            np.add.at(rhs, i, self.v[cols[i, j]] * weight[:, None])
        return self._finish(lhs, rhs, neg is None, base_min, b.rows)


def _matvec(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Σ_l w[i, l] v[i, l, :] for every i (batched vector-matrix product)."""
    return np.matmul(w[:, None, :], v)[:, 0, :]


def _batches(n_rows: int, length: int, k: int):
    """Row batches [rs] of a chunk (their k × k matrices take about _BATCH_ELEMENTS),
    each with its gather pieces [(row slice within the batch, entry slice)] of at most
    _PIECE_ELEMENTS elements (a long row is cut along its entries)."""
    per_row = length * k
    batch = max(1, _BATCH_ELEMENTS // (k * k))
    if per_row <= _PIECE_ELEMENTS:
        step = max(1, _PIECE_ELEMENTS // per_row)
        batch = max(batch, step)
        for a in range(0, n_rows, batch):
            nb = min(batch, n_rows - a)
            pieces = [(slice(b, min(b + step, nb)), slice(0, length))
                      for b in range(0, nb, step)]
            yield slice(a, a + nb), pieces
    else:
        step = max(1, _PIECE_ELEMENTS // k)
        for a in range(n_rows):
            pieces = [(slice(0, 1), slice(e, min(e + step, length)))
                      for e in range(0, length, step)]
            yield slice(a, a + 1), pieces


def _gram_and_rhs(scaled: np.ndarray, cols: np.ndarray, y: np.ndarray | None, pieces,
                  entry_scale: np.ndarray | None = None):
    """Per row i: Σ_l x xᵀ and Σ_l y[i, l] x over x = scaled[cols[i, l]] (float64;
    times entry_scale[i, l] if given), gathered piece by piece."""
    n, length = cols.shape
    k = scaled.shape[1]
    lhs = np.empty((n, k, k))
    rhs = np.empty((n, k)) if y is not None else None
    whole = pieces[0][1].stop == length        # else: one long row, cut along entries
    if not whole:
        lhs[:] = 0.0
        if rhs is not None:
            rhs[:] = 0.0
    size = max((p[0].stop - p[0].start) * (p[1].stop - p[1].start) for p in pieces)
    buf = np.empty(size * k)
    for rs, es in pieces:
        idx = cols[rs, es]
        x = buf[:idx.size * k].reshape(idx.shape + (k,))
        np.take(scaled, idx, axis=0, out=x, mode='clip')
        if entry_scale is not None:
            x *= entry_scale[rs, es][..., None]
        if whole:
            np.matmul(x.transpose(0, 2, 1), x, out=lhs[rs])  # BLAS syrk per row
            if rhs is not None:
                np.matmul(y[rs, None, :], x, out=rhs[rs, None, :])
        else:
            lhs[rs] += np.matmul(x.transpose(0, 2, 1), x)
            if rhs is not None:
                rhs[rs] += _matvec(x, y[rs, es])
    return lhs, rhs


def _weighted_sums(v: np.ndarray, cols: np.ndarray, w: np.ndarray, pieces) -> np.ndarray:
    """Σ_l w[i, l] v[cols[i, l]] for every row i, piece by piece."""
    out = np.zeros((cols.shape[0], v.shape[1]))
    for rs, es in pieces:
        out[rs] += _matvec(np.take(v, cols[rs, es], axis=0, mode='clip'), w[rs, es])
    return out


# -- batched symmetric solves -----------------------------------------------------------

def _gufunc(name: str):
    return getattr(getattr(np.linalg, '_umath_linalg', None), name, None)


def _cholesky_lower(a: np.ndarray) -> np.ndarray:
    """Batched lower Cholesky factors; a matrix that is not positive definite gets
    NaNs instead of failing the batch."""
    gufunc = _gufunc('cholesky_lo')
    if gufunc is not None:
        with np.errstate(invalid='ignore', divide='ignore', over='ignore', under='ignore'):
            return gufunc(a, signature='d->d')
    try:
        return np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        out = np.empty_like(a)
        for i in range(len(a)):
            try:
                out[i] = np.linalg.cholesky(a[i])
            except np.linalg.LinAlgError:
                out[i] = np.nan
        return out


def _lu_solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched LAPACK gesv; a singular system gets NaNs instead of failing the batch."""
    gufunc = _gufunc('solve1')
    if gufunc is not None:
        with np.errstate(invalid='ignore', divide='ignore', over='ignore', under='ignore'):
            return gufunc(lhs, rhs, signature='dd->d')
    try:
        return np.linalg.solve(lhs, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.full(rhs.shape, np.nan)


def _spd_solve(lhs: np.ndarray, rhs: np.ndarray, safe: bool = False) -> np.ndarray:
    """Solves lhs[i] x[i] = rhs[i] for symmetric positive semi-definite lhs[i];
    (numerically) singular ones get the pseudo-inverse answer.

    safe: the caller knows every lhs[i] is well conditioned: one batched LU solve
    (LAPACK gesv; for k >= ~16 cheaper than potrf plus vectorized substitutions)."""
    if safe:
        x = _lu_solve(lhs, rhs)
        bad = ~np.all(np.isfinite(x), axis=1)
        if np.any(bad):
            x[bad] = _spd_solve(lhs[bad], rhs[bad])
        return x
    chol = _cholesky_lower(lhs)
    diag = np.diagonal(chol, axis1=1, axis2=2)
    scale = np.max(np.diagonal(lhs, axis1=1, axis2=2), axis=1)
    with np.errstate(invalid='ignore'):
        good = np.all(diag * diag > _PIVOT_RTOL * scale[:, None], axis=1)
    if np.all(good):
        return _cholesky_solve(chol, rhs)
    x = np.empty(rhs.shape)
    if np.any(good):
        x[good] = _cholesky_solve(chol[good], rhs[good])
    bad = np.flatnonzero(~good)
    # Non-finite inputs (e.g. a NaN rating) stay NaN, for the caller to notice.
    finite = np.all(np.isfinite(lhs[bad]), axis=(1, 2)) & np.all(np.isfinite(rhs[bad]), axis=1)
    x[bad[~finite]] = np.nan
    if np.any(finite):
        x[bad[finite]] = _pinv_solve(lhs[bad[finite]], rhs[bad[finite]])
    return x


def _cholesky_solve(chol: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """x with chol cholᵀ x = rhs for a batch of lower factors (n × k × k): forward
    and back substitution, each step vectorized over the batch."""
    k = rhs.shape[1]
    x = np.array(rhs, dtype=np.float64, copy=True)
    diag = np.diagonal(chol, axis1=1, axis2=2)
    for j in range(k):
        if j:
            x[:, j] -= np.einsum('nj,nj->n', chol[:, j, :j], x[:, :j])
        x[:, j] /= diag[:, j]
    for j in range(k - 1, -1, -1):
        if j + 1 < k:
            x[:, j] -= np.einsum('nj,nj->n', chol[:, j + 1:, j], x[:, j + 1:])
        x[:, j] /= diag[:, j]
    return x


def _pinv_solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Minimum-norm least-squares answers for symmetric lhs (eigenvalues below
    _PINV_RTOL × the largest |eigenvalue| count as zero)."""
    vals, vecs = np.linalg.eigh(np.asarray(lhs, dtype=np.float64))
    cutoff = _PINV_RTOL * np.max(np.abs(vals), axis=-1, keepdims=True)
    keep = np.abs(vals) > cutoff
    inv = np.divide(1.0, vals, out=np.zeros_like(vals), where=keep)
    proj = np.einsum('nji,nj->ni', vecs, rhs) * inv
    return np.einsum('nij,nj->ni', vecs, proj)


class _SharedSolver:
    """Solves with one symmetric matrix (w0*G + λI) for many right-hand sides."""

    def __init__(self, a: np.ndarray):
        k = len(a)
        chol = _cholesky_lower(a[None])[0]
        d = np.diagonal(chol)
        with np.errstate(invalid='ignore'):
            good = bool(np.all(d * d > _PIVOT_RTOL * np.max(np.diagonal(a))))
        # Its inverse (or pseudo-inverse), column by column of the identity.
        eye = np.eye(k)
        if good:
            self._inv = _cholesky_solve(np.broadcast_to(chol, (k, k, k)), eye)
        else:
            self._inv = _pinv_solve(np.broadcast_to(a, (k, k, k)), eye)

    def __call__(self, rhs: np.ndarray) -> np.ndarray:
        return rhs @ self._inv          # the inverse is symmetric


def batched_solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solves lhs[i] x[i] = rhs[i] for symmetric positive semi-definite lhs[i];
    singular systems get the least-squares (pseudo-inverse) answer instead of
    failing the batch."""
    return _spd_solve(np.asarray(lhs, dtype=np.float64), np.asarray(rhs, dtype=np.float64))


# -- BLAS threads ---------------------------------------------------------------------

_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None
_blas_controller = None


@contextlib.contextmanager
def single_threaded_blas():
    """numpy's BLAS on one thread while any solve runs (threadpoolctl; reference
    counted, so overlapping calls from several threads restore it once, at the end)."""
    global _blas_users, _blas_limiter, _blas_controller
    with _blas_lock:
        if _blas_users == 0:
            try:
                if _blas_controller is None:
                    _blas_controller = ThreadpoolController()
                _blas_limiter = _blas_controller.limit(limits=1, user_api='blas')
            except Exception:   # noqa: BLE001 -- an optimization must never fail a solve
                _blas_limiter = None
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_limiter is not None:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None

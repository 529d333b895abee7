"""Conjugate-gradient half-step (RowSolver's `solver='cg'`): a few CG steps per row,
warm-started from the row's previous factors (Takács, Pilászy & Tikk 2011; the
`implicit` library's default solver), for every objective of objectives.py.

Row i's system (see solve.py) is A_i x = b_i with
    A_i = B + λ_i I + Σ_l c_l v_l v_lᵀ,        b_i = Σ_l w_l v_l,
over its entries l (other-side row j_l, value A_l), B = w0 VᵀV + λI the shared
part (the Gramian trick: Y_iᵀ C_i Y_i = w0 YᵀY + Σ_observed ..., so only observed
entries are visited), c_l = R_i C_j E_l the entry's extra weight and
w_l = (w0 + c_l)(A_l - o_j) (o_j: per-column offsets, the explicit mode's bias).
A matrix-vector product A_i p needs the gathered v_l twice (q = X p, then Xᵀ(c q))
and B p: no k × k matrix per row is formed, and no factorization.

How it runs
-----------
* Planned once per block (kept by the RowSolver): rows are grouped by a padded
  length that is a function of the row's own entry count only (_padded_lengths:
  multiples of 16, then steps of at most 1/16), so a row is computed with the same
  shapes whatever other rows share its batch; per batch the other-side row ids
  (padding: a zero row), c and w (float32; c stored as one number when it is
  the same for every entry, e.g. 1 for the explicit mode) -- about 12 bytes per
  padded entry (8 for the explicit mode, whose c and w0 + c are 1).
* Per call and batch: the batch's other-side factors are gathered ONCE as a float32
  (rows × length × k) array (at most _CG_ELEMENTS elements: it stays in cache
  through all the steps; a row above _PIECE_ELEMENTS is processed in fixed pieces
  gathered per pass),
  then every step is two batched float32 matrix-vector products through numpy's
  matmul (one BLAS gemv per row: its result depends on that row's data and shape
  only) and O(k) vector work per row in float64. B p is a per-row float64 gemv
  (a 2-D GEMM over the batch would round differently by a row's position in it).
  The last step skips Xᵀ(c q) (its pᵀA p comes from q), so s steps cost 2s + 1
  passes over the gathered factors (2s + 2 with a start x0).
* Per-row results are therefore independent of batching, of the number of Python
  threads and of BLAS threads (numpy's BLAS runs single-threaded during a solve).

It is APPROXIMATE: `steps` CG iterations from x0 (default 3, as `implicit`), exact
in exact arithmetic after k steps, but the float32 products limit the attainable
accuracy to about 1e-6 relative. It assumes positive definite systems (R, C, E >= 0
and B + λ_i I positive definite); a row whose search direction has pᵀA p <= 0 stops
where it is. A row with no entries gets 0 (its exact answer); a NaN input stays
visible (NaN) in its row.
"""
from __future__ import annotations

import dataclasses
import threading

import numpy as np

# Gathered float32 elements (rows × padded length × k) of one CG batch: 4 MiB, in
# cache through the steps, and big enough that numpy's per-call overhead is small.
_CG_ELEMENTS = 1 << 20
# A row longer than this many elements (padded length × k) is not held whole: it is
# gathered again in every pass, in pieces of this size (fixed, so a row's result
# never depends on the batch size).
_PIECE_ELEMENTS = 1 << 20
# Padded lengths: multiples of _ALIGN up to _LINEAR_UNTIL, then steps of at most
# 1/16 (rounded up to a multiple of _ALIGN): at most 6.25% (or 15 entries) of padding.
_ALIGN = 16
_LINEAR_UNTIL = 256


def padded_lengths(counts: np.ndarray) -> np.ndarray:
    """The padded length of a row with `counts` entries (int64; a function of the
    count alone, never of the other rows)."""
    counts = np.asarray(counts, dtype=np.int64)
    top = int(counts.max()) if counts.size else 0
    ladder = list(range(_ALIGN, _LINEAR_UNTIL + 1, _ALIGN))
    while ladder[-1] < top:
        ladder.append(-(-(ladder[-1] * 17) // (16 * _ALIGN)) * _ALIGN)
    ladder = np.asarray(ladder, dtype=np.int64)
    return ladder[np.searchsorted(ladder, counts, side='left')]


@dataclasses.dataclass
class CgBatch:
    """The iteration-invariant inputs of one batch of rows for the CG solver."""
    rows: np.ndarray                  # row numbers in the block
    cols: np.ndarray                  # (rows × length) other-side rows; padding -> m
    c: np.ndarray | float             # R_i C_j E_ij per entry (float32), or one value
    w: np.ndarray                     # (w0 + c) A_ij per entry (float32; 0 at padding)
    wf: np.ndarray | float | None     # offsets: (w0 + c) per entry (w shifts by -wf o_j)
    reg: np.ndarray | None            # λ_i of the rows (per-row regularization)

    @property
    def nbytes(self) -> int:
        arrays = (self.rows, self.cols, self.c, self.w, self.wf, self.reg)
        return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


def plan(solver) -> list[CgBatch]:
    """The CG batches of a RowSolver's block: rows with entries, grouped by padded
    length (then by row number), at most _CG_ELEMENTS gathered elements a batch
    (a longer row alone)."""
    lens = np.diff(solver.indptr)
    rows = np.flatnonzero(lens > 0)
    if not len(rows) or not solver.k:
        return []
    padded = padded_lengths(lens[rows])
    order = np.lexsort((rows, padded))
    rows, padded = rows[order], padded[order]
    edges = np.concatenate(([0], np.flatnonzero(np.diff(padded)) + 1, [len(rows)]))
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        length = int(padded[a])
        per = max(1, _CG_ELEMENTS // (length * solver.k))
        for s in range(a, b, per):
            out.append(_plan_batch(solver, rows[s:min(s + per, b)], length))
    return out


def _plan_batch(solver, rows: np.ndarray, length: int) -> CgBatch:
    starts = solver.indptr[rows]
    lens = solver.indptr[rows + 1] - starts
    pos = np.add.outer(starts, np.arange(length, dtype=np.int64))
    pad = pos >= (starts + lens)[:, None]
    np.minimum(pos, (starts + lens - 1)[:, None], out=pos)
    cols = np.take(solver.indices, pos, mode='clip').astype(np.int64)
    vals = np.take(solver.values, pos, mode='clip')
    c = solver.own[rows][:, None] * np.take(solver.other, cols, mode='clip')
    if solver.entry is not None:
        c *= np.take(solver.entry, pos, mode='clip')
    wf = solver.w0 + c
    w = wf * vals
    cols[pad] = solver.m                      # the zero row: padding adds nothing
    w[pad] = 0.0
    real = ~pad
    out_c = _constant_or_array(c, real)
    out_wf = _constant_or_array(wf, real) if solver.offsets else None
    idx_type = np.int32 if solver.m < np.iinfo(np.int32).max else np.int64
    reg = solver.row_reg[rows].copy() if solver.row_reg is not None else None
    return CgBatch(rows, cols.astype(idx_type), out_c, w.astype(np.float32), out_wf, reg)


def _constant_or_array(a: np.ndarray, real: np.ndarray) -> np.ndarray | float:
    """One float when every real entry of `a` has the same value (padding gathers
    the zero row, so its value does not matter), else float32 with 0 at padding."""
    vals = a[real]
    if vals.size and np.all(vals == vals.flat[0]) and np.isfinite(vals.flat[0]):
        return float(vals.flat[0])
    out = a.astype(np.float32)
    out[~real] = 0.0
    return out


class Inputs:
    """What every batch of one CG call shares: float32 other-side factors with a zero
    row appended (row m) and, with offsets, o_j as one more column (gathered with
    the factors instead of by a second gather per entry); B = w0 VᵀV + λI in float64."""

    def __init__(self, factors: np.ndarray, base: np.ndarray, offsets: np.ndarray | None):
        m, k = factors.shape
        self.k = k
        self.offsets = offsets is not None
        self.table = np.zeros((m + 1, k + self.offsets), dtype=np.float32)
        self.table[:m, :k] = factors
        if self.offsets:
            self.table[:m, k] = offsets[:m]
        self.base = np.ascontiguousarray(base, dtype=np.float64)
        self.base_zero = not np.any(self.base)      # w0 = 0, λ per row: B p = 0


_local = threading.local()


def _workspace(size: int) -> np.ndarray:
    """A float32 scratch array of `size` elements, one per thread, reused across
    batches (a fresh 4 MiB array per batch costs page faults)."""
    buf = getattr(_local, 'buf', None)
    if buf is None or buf.size < size:
        raw = np.empty(max(size, _CG_ELEMENTS) + 16, dtype=np.float32)
        skip = (-raw.ctypes.data % 64) // 4         # 64-byte aligned rows (lengths % 16 == 0)
        buf = _local.buf = raw[skip:skip + max(size, _CG_ELEMENTS)]
    return buf[:size]


class _Gathered:
    """X, the batch's gathered factors (rows × length × k float32): q = X p per row
    and Xᵀ t per row (batched BLAS gemv). Rows longer than _PIECE_ELEMENTS are
    gathered again piece by piece in every pass instead of held whole. A table
    column after the k factors (the offsets) is gathered along and read by `extra`."""

    def __init__(self, table: np.ndarray, cols: np.ndarray, k: int):
        self.table, self.cols, self.k = table, cols, k
        n, length = cols.shape
        width = table.shape[1]
        self.piece = length
        self.full = None
        if length * width > _PIECE_ELEMENTS:         # long rows
            self.piece = max(_ALIGN, (_PIECE_ELEMENTS // width) // _ALIGN * _ALIGN)
        else:
            self.full = _workspace(n * length * width).reshape(n, length, width)
            np.take(table, cols, axis=0, out=self.full, mode='clip')
        # The factors (a strided view when there is an extra column: BLAS reads it
        # with a leading dimension of k + 1, the same for every row).
        self.x = None if self.full is None else self.full[:, :, :k]

    def extra(self) -> np.ndarray:
        """The gathered extra column (rows × length)."""
        if self.full is not None:
            return self.full[:, :, self.k]
        return np.take(self.table[:, self.k], self.cols, mode='clip')

    def _pieces(self):
        length = self.cols.shape[1]
        for e in range(0, length, self.piece):
            sl = slice(e, min(e + self.piece, length))
            yield sl, np.take(self.table, self.cols[:, sl], axis=0, mode='clip')[:, :, :self.k]

    def times(self, p: np.ndarray) -> np.ndarray:
        """q[i] = X[i] p[i] (rows × length float32); p float32 (rows × k)."""
        if self.x is not None:
            return np.matmul(self.x, p[:, :, None])[:, :, 0]
        q = np.empty(self.cols.shape, dtype=np.float32)
        for sl, x in self._pieces():
            q[:, sl] = np.matmul(x, p[:, :, None])[:, :, 0]
        return q

    def t_times(self, t: np.ndarray) -> np.ndarray:
        """Xᵀ[i] t[i] (rows × k, float64); t float32 (rows × length)."""
        if self.x is not None:
            return np.matmul(t[:, None, :], self.x)[:, 0, :].astype(np.float64)
        out = np.zeros((self.cols.shape[0], self.k))
        for sl, x in self._pieces():               # pieces at fixed offsets, in order
            out += np.matmul(np.ascontiguousarray(t[:, sl])[:, None, :], x)[:, 0, :]
        return out


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Σ_j a[i, j] b[i, j] per row (float64; a fixed order per row)."""
    return np.einsum('ij,ij->i', a, b).astype(np.float64, copy=False)


def solve_batch(b: CgBatch, inputs: Inputs, x0: np.ndarray | None, steps: int
                ) -> np.ndarray:
    """`steps` CG iterations for the batch's rows from x0 (rows × k, or None: 0);
    returns the rows' solutions (float64)."""
    k = inputs.k
    n = len(b.rows)
    x = np.zeros((n, k)) if x0 is None else np.array(x0, dtype=np.float64)
    if steps == 0:
        return x
    X = _Gathered(inputs.table, b.cols, k)
    base = inputs.base

    def shared(p):
        """(B + λ_i I) p per row, float64 (per-row gemv: no GEMM over the batch)."""
        if inputs.base_zero:
            return np.zeros_like(p) if b.reg is None else b.reg[:, None] * p
        out = np.matmul(p[:, None, :], base)[:, 0, :]
        if b.reg is not None:
            out += b.reg[:, None] * p
        return out

    def weighted(q):
        return q if isinstance(b.c, float) and b.c == 1.0 else q * b.c

    # r = b - A x0 = Xᵀ(w - c X x0) - (B + λ_i I) x0
    w = b.w
    if inputs.offsets:
        shift = X.extra()
        if not (isinstance(b.wf, float) and b.wf == 1.0):
            shift = shift * b.wf
        w = w - shift
    no_matrix = isinstance(b.c, float) and b.c == 0.0
    if x0 is None:
        r = X.t_times(w)
    else:
        t = w if no_matrix else w - weighted(X.times(x.astype(np.float32)))
        r = X.t_times(t)
        r -= shared(x)
    p = r.copy()
    rs = _rowdot(r, r)
    with np.errstate(invalid='ignore', divide='ignore', over='ignore'):
        for step in range(steps):
            bp = shared(p)
            pap = _rowdot(p, bp)
            if not no_matrix:
                q = X.times(p.astype(np.float32))
                cq = weighted(q)
                pap += _rowdot(cq, q)
            # pᵀAp <= 0: not positive definite (or converged, p = 0): stop the row.
            # NaN stays NaN (comparisons with NaN are False).
            alpha = rs / pap
            alpha[pap <= 0] = 0.0
            x += alpha[:, None] * p
            if step == steps - 1:
                break
            ap = bp if no_matrix else bp + X.t_times(cq)
            r -= alpha[:, None] * ap
            rs_new = _rowdot(r, r)
            beta = rs_new / rs
            beta[rs == 0] = 0.0
            p *= beta[:, None]
            p += r
            rs = rs_new
    return x

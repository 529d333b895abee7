"""The WALS half-step: solve every row of a block against the other side's factors.

For row i with observed columns j, other factors v_j, Gramian G = VᵀV:
    (w0*G + λI + Σ_j R_i*C_j v_j v_jᵀ) u_i = Σ_j (w0 + R_i*C_j) A_ij v_j

How it is computed (exact solver)
---------------------------------
Rows are processed in chunks (bounded memory), the chunks spread over a few
threads (numpy and BLAS release the GIL). Per chunk:

* Per-row weighted Gramians by BLAS-3: the entries of a row are gathered as
  x_j = sqrt(R_i C_j) v_j, so that Σ_j R_i C_j v_j v_jᵀ = XᵀX. A row is cut into
  full segments of `_SEGMENT` entries plus a remainder padded with zero rows to a
  multiple of `_PAD`; equal-shaped pieces are stacked into (pieces × length × k)
  arrays and multiplied in one batched call (numpy hands XᵀX to BLAS syrk), the
  segments of a row are then summed. Everything is float64 (no float32
  accumulation), so results agree with a dense per-row solve to rounding.
  The right-hand sides come from the same gathered pieces (a batched matvec).
* Batched Cholesky (LAPACK potrf per matrix) of w0*G + λI + XᵀX, then vectorized
  forward/back substitution.
* A row whose Cholesky fails or has a pivot below `_PIVOT_RTOL` × its largest
  diagonal element (singular or numerically singular, e.g. λ = w0 = 0 with fewer
  ratings than factors) gets the pseudo-inverse (least-squares, minimum-norm)
  answer from an eigendecomposition, eigenvalues below `_PINV_RTOL` × the largest
  treated as zero. Other rows of the batch are not affected.
* When every R_i*C_j of a chunk is 0 (weights off), all its rows share the matrix
  w0*G + λI: one factorization, one multi-right-hand-side solve.

OpenBLAS's own threading is slow for these many small products (and badly so on a
busy machine), so while solving, numpy's OpenBLAS is set to one thread (restored
afterwards) and the chunks are spread over `num_threads` Python threads instead.

Optional conjugate-gradient solver (`solver='cg'`): `cg_steps` CG iterations per
row, warm-started from `x0` (e.g. the previous solution, as `implicit` does), using
the per-row operator without forming the Gramians. It is APPROXIMATE: its answer
approaches the exact one as cg_steps grows (exact, up to rounding, at cg_steps = k).
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse

from wals_core.sparse import Csr

# Bound on the per-chunk temporary arrays (elements), so memory stays flat for big blocks.
_CHUNK_ELEMENTS = 1 << 23
# Entries of a chunk (bounds the per-entry temporaries: ~40 bytes per entry).
_CHUNK_ENTRIES = 1 << 19
# Elements of one gathered (pieces × length × k) stack: 2^17 float64 = 1 MB, cache-resident.
_TASK_ELEMENTS = 1 << 17
# Rows are cut into segments of this many entries; remainders are padded to a multiple of _PAD.
_SEGMENT = 128
_PAD = 8
# A Cholesky pivot² below this × the row's largest diagonal element means "singular".
_PIVOT_RTOL = 1e-10
# Pseudo-inverse cutoff (relative to the largest eigenvalue) for those rows.
_PINV_RTOL = 1e-10


def gramian(factors: np.ndarray) -> np.ndarray:
    """VᵀV in float64."""
    f = np.asarray(factors, dtype=np.float64)
    return f.T @ f


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


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

    solver: 'exact' (default; Cholesky) or 'cg' (approximate: `cg_steps` conjugate-
    gradient steps per row starting from `x0`, block.num_rows × k, zeros if None).
    num_threads: worker threads (default: the CPUs this process may use).
    """
    if solver not in ('exact', 'cg'):
        raise ValueError(f"solver must be 'exact' or 'cg', got {solver!r}")
    ctx = _Context(block, self_weights, other_factors, other_weights, other_gramian,
                   unobs_weight, regularization)
    out = np.zeros((ctx.n, ctx.k), dtype=np.float64)
    if ctx.n == 0 or ctx.k == 0 or block.nnz == 0:
        return out
    if solver == 'cg':
        if x0 is None:
            start = np.zeros((ctx.n, ctx.k), dtype=np.float64)
        else:
            start = np.asarray(x0, dtype=np.float64)
            if start.shape != (ctx.n, ctx.k):
                raise ValueError(f'x0 must have shape {(ctx.n, ctx.k)}, got {start.shape}')
        steps = int(cg_steps)
        if steps < 0:
            raise ValueError(f'cg_steps must be >= 0, got {cg_steps!r}')

        def work(lo, hi):
            out[lo:hi] = ctx.cg_chunk(lo, hi, start[lo:hi], steps)
    else:
        def work(lo, hi):
            out[lo:hi] = ctx.exact_chunk(lo, hi)

    chunks = ctx.chunks()
    threads = _default_threads() if num_threads is None else max(1, int(num_threads))
    threads = min(threads, len(chunks))
    with _single_threaded_blas():
        if threads <= 1:
            for lo, hi in chunks:
                work(lo, hi)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                # Largest chunks first, so the last ones to finish are small.
                order = sorted(chunks, key=lambda c: -(ctx.indptr[c[1]] - ctx.indptr[c[0]]))
                for f in [pool.submit(work, lo, hi) for lo, hi in order]:
                    f.result()
    return out


class _Context:
    """One solve_rows call's inputs, in the dtypes the kernels want."""

    def __init__(self, block, self_weights, other_factors, other_weights, other_gramian,
                 unobs_weight, regularization):
        self.indptr = np.asarray(block.indptr, dtype=np.int64)
        self.indices = block.indices
        self.values = np.asarray(block.values, dtype=np.float64)
        self.n = block.num_rows
        factors = np.asarray(other_factors)
        self.k = factors.shape[1]
        self.v = np.ascontiguousarray(factors, dtype=np.float64)
        self.own = np.asarray(self_weights, dtype=np.float64)
        self.other = np.asarray(other_weights, dtype=np.float64)
        self.w0 = float(unobs_weight)
        self.base = self.w0 * np.asarray(other_gramian, dtype=np.float64) \
            + float(regularization) * np.eye(self.k)
        self._base_solver = None
        self._lock = threading.Lock()

    # -- chunking ---------------------------------------------------------------------

    def chunks(self) -> list[tuple[int, int]]:
        """Row ranges [lo, hi): at most per_row rows and (unless one row alone is
        bigger) at most _CHUNK_ENTRIES entries."""
        k = self.k
        per_row = max(1, _CHUNK_ELEMENTS // (k * k))
        out = []
        start = 0
        while start < self.n:
            limit = self.indptr[start] + _CHUNK_ENTRIES
            stop = int(np.searchsorted(self.indptr, limit, side='right')) - 1
            stop = min(max(stop, start + 1), start + per_row, self.n)
            out.append((start, stop))
            start = stop
        return out

    def _entries(self, lo, hi):
        """Local CSR pieces of rows [lo, hi) and their per-entry weights."""
        e0, e1 = int(self.indptr[lo]), int(self.indptr[hi])
        ptr = self.indptr[lo:hi + 1] - e0
        cols = self.indices[e0:e1]
        vals = self.values[e0:e1]
        lens = np.diff(ptr)
        conf = np.repeat(self.own[lo:hi], lens) * self.other[cols]   # R_i * C_j per entry
        return ptr, lens, cols, vals, conf

    # -- shared matrix (weights off) --------------------------------------------------

    def base_solve(self, rhs: np.ndarray) -> np.ndarray:
        """(w0*G + λI)⁻¹ rhsᵀ for rhs (n × k), pseudo-inverse if singular."""
        with self._lock:
            if self._base_solver is None:
                self._base_solver = _SharedSolver(self.base)
        return self._base_solver(rhs)

    def _sparse_rhs(self, ptr, cols, weights, n) -> np.ndarray:
        m = self.v.shape[0]
        mat = scipy.sparse.csr_matrix((weights, cols, ptr), shape=(n, m))
        return np.asarray(mat @ self.v)

    # -- exact ------------------------------------------------------------------------

    def exact_chunk(self, lo: int, hi: int) -> np.ndarray:
        n, k = hi - lo, self.k
        ptr, lens, cols, vals, conf = self._entries(lo, hi)
        w = (self.w0 + conf) * vals                      # right-hand-side weights
        if not np.any(conf):
            return self.base_solve(self._sparse_rhs(ptr, cols, w, n))
        if np.any(conf < 0):
            raise ValueError('negative observation weights R_i * C_j are not supported')
        s = np.sqrt(conf)
        zero = s == 0
        ws = np.divide(w, s, out=np.zeros_like(w), where=~zero)
        lhs, rhs = _gramians(self.v, ptr, lens, cols, s, ws)
        if np.any(zero & (w != 0)):
            rhs += self._sparse_rhs(ptr, cols, np.where(zero, w, 0.0), n)
        lhs += self.base
        has = lens > 0
        x = np.zeros((n, k))
        if np.all(has):
            x = _spd_solve(lhs, rhs)
        else:
            x[has] = _spd_solve(lhs[has], rhs[has])
        return x

    # -- conjugate gradient -----------------------------------------------------------

    def cg_chunk(self, lo: int, hi: int, x: np.ndarray, steps: int) -> np.ndarray:
        """`steps` CG iterations per row on (base + Σ c_j v_j v_jᵀ) x = b, from x."""
        n, k = hi - lo, self.k
        ptr, lens, cols, vals, conf = self._entries(lo, hi)
        w = (self.w0 + conf) * vals
        x = np.array(x, dtype=np.float64, copy=True)
        has = lens > 0
        x[~has] = 0.0
        if steps == 0 or not np.any(has):
            return x
        b = self._sparse_rhs(ptr, cols, w, n)
        rows = np.repeat(np.arange(n), lens)
        v = self.v[cols]                                 # entries × k, float64
        nz = np.flatnonzero(conf)
        v_nz, rows_nz, conf_nz = v[nz], rows[nz], conf[nz]
        del v

        def apply(p):
            out = p @ self.base
            if len(nz):
                t = np.einsum('ek,ek->e', v_nz, p[rows_nz]) * conf_nz
                contrib = v_nz * t[:, None]
                for j in range(k):
                    out[:, j] += np.bincount(rows_nz, contrib[:, j], minlength=n)
            return out

        r = b - apply(x)
        r[~has] = 0.0
        p = r.copy()
        rs = np.einsum('ij,ij->i', r, r)
        for _ in range(steps):
            ap = apply(p)
            pap = np.einsum('ij,ij->i', p, ap)
            ok = (pap > 0) & (rs > 0)
            alpha = np.divide(rs, pap, out=np.zeros(n), where=ok)
            x += alpha[:, None] * p
            r -= alpha[:, None] * ap
            rs_new = np.einsum('ij,ij->i', r, r)
            beta = np.divide(rs_new, rs, out=np.zeros(n), where=ok)
            p = r + beta[:, None] * p
            rs = rs_new
        return x


def _gramians(v, ptr, lens, cols, s, ws):
    """Per-row Σ_j s_j² v_j v_jᵀ (n × k × k) and Σ_j ws_j s_j v_j (n × k), float64."""
    n, k = len(lens), v.shape[1]
    lhs = np.zeros((n, k, k))
    rhs = np.zeros((n, k))
    # A sentinel entry (column 0, weight 0) that padding positions point at.
    sentinel = len(cols)
    cols = np.append(cols, 0)
    s = np.append(s, 0.0)
    ws = np.append(ws, 0.0)

    def run(rows, starts, length, valid=None):
        """Pieces [starts, starts + length) (valid: true lengths, rest padding)."""
        per_task = max(1, _TASK_ELEMENTS // (length * k))
        for a in range(0, len(rows), per_task):
            r, st = rows[a:a + per_task], starts[a:a + per_task]
            idx = st[:, None] + np.arange(length)
            if valid is not None:
                idx[np.arange(length) >= valid[a:a + per_task, None]] = sentinel
            x = np.take(v, np.take(cols, idx), axis=0)           # pieces × length × k
            x *= np.take(s, idx)[..., None]
            g = np.matmul(x.transpose(0, 2, 1), x)               # syrk per piece
            b = np.matmul(np.take(ws, idx)[:, None, :], x)[:, 0]  # pieces × k
            # A row may own several consecutive pieces: sum them first.
            first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
            if len(first) != len(r):
                g = np.add.reduceat(g, first, axis=0)
                b = np.add.reduceat(b, first, axis=0)
                r = r[first]
            lhs[r] += g
            rhs[r] += b

    q = lens // _SEGMENT
    if np.any(q):
        seg_rows = np.repeat(np.arange(n), q)
        within = np.arange(len(seg_rows)) - np.repeat(np.cumsum(q) - q, q)
        run(seg_rows, ptr[seg_rows] + within * _SEGMENT, _SEGMENT)
    rem = lens - q * _SEGMENT
    padded = -(-rem // _PAD) * _PAD
    for length in np.unique(padded[padded > 0]):
        rows = np.flatnonzero(padded == length)
        run(rows, ptr[rows] + q[rows] * _SEGMENT, int(length), rem[rows])
    return lhs, rhs


def _cholesky_lower(a: np.ndarray) -> np.ndarray:
    """Batched lower Cholesky factors; a matrix that is not positive definite gets
    NaNs instead of failing the batch."""
    gufunc = getattr(getattr(np.linalg, '_umath_linalg', None), 'cholesky_lo', None)
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


def _spd_solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solves lhs[i] x[i] = rhs[i] for symmetric positive semi-definite lhs[i];
    (numerically) singular ones get the pseudo-inverse answer."""
    n, k = rhs.shape
    chol = _cholesky_lower(lhs)
    diag = np.diagonal(chol, axis1=1, axis2=2)
    scale = np.max(np.diagonal(lhs, axis1=1, axis2=2), axis=1)
    with np.errstate(invalid='ignore'):
        good = np.all(diag * diag > _PIVOT_RTOL * scale[:, None], axis=1)
    x = np.empty((n, k))
    if np.all(good):
        return _cholesky_solve(chol, rhs)
    if np.any(good):
        x[good] = _cholesky_solve(chol[good], rhs[good])
    bad = ~good
    x[bad] = _pinv_solve(lhs[bad], rhs[bad])
    return x


def _cholesky_solve(chol: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """x with chol chol ᵀ x = rhs, batched (forward then back substitution)."""
    k = rhs.shape[1]
    x = np.array(rhs, dtype=np.float64, copy=True)
    for j in range(k):
        x[:, j] /= chol[:, j, j]
        if j + 1 < k:
            x[:, j + 1:] -= chol[:, j + 1:, j] * x[:, j, None]
    for j in range(k - 1, -1, -1):
        x[:, j] /= chol[:, j, j]
        if j:
            x[:, :j] -= chol[:, j, :j] * x[:, j, None]
    return x


def _pinv_solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Minimum-norm least-squares answers for symmetric lhs (eigenvalues below
    _PINV_RTOL × the largest |eigenvalue| count as zero)."""
    lhs = np.nan_to_num(np.asarray(lhs, dtype=np.float64))
    vals, vecs = np.linalg.eigh(lhs)
    cutoff = _PINV_RTOL * np.max(np.abs(vals), axis=-1, keepdims=True)
    keep = np.abs(vals) > cutoff
    inv = np.divide(1.0, vals, out=np.zeros_like(vals), where=keep)
    proj = np.einsum('nji,nj->ni', vecs, rhs) * inv
    return np.einsum('nij,nj->ni', vecs, proj)


class _SharedSolver:
    """Solves with one symmetric matrix for many right-hand sides."""

    def __init__(self, a: np.ndarray):
        self._a = a
        self._chol = None
        k = a.shape[0]
        if k:
            chol = _cholesky_lower(a[None])[0]
            d = np.diagonal(chol)
            with np.errstate(invalid='ignore'):
                if np.all(d * d > _PIVOT_RTOL * np.max(np.diagonal(a))):
                    self._chol = chol

    def __call__(self, rhs: np.ndarray) -> np.ndarray:
        if self._chol is not None:
            import scipy.linalg
            return scipy.linalg.cho_solve((self._chol, True), rhs.T, check_finite=False).T
        return _pinv_solve(np.broadcast_to(self._a, (len(rhs),) + self._a.shape), rhs)


def batched_solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solves lhs[i] x[i] = rhs[i] for symmetric positive semi-definite lhs[i];
    singular systems get the least-squares (pseudo-inverse) answer instead of
    failing the batch."""
    return _spd_solve(np.asarray(lhs, dtype=np.float64), np.asarray(rhs, dtype=np.float64))


# -- BLAS threads ---------------------------------------------------------------------

_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved = None
_blas_api = None          # (get, set) of numpy's OpenBLAS, or False if not found


def _find_openblas():
    """get/set_num_threads of the OpenBLAS numpy is linked with (Linux), else None."""
    names = [('scipy_openblas_get_num_threads64_', 'scipy_openblas_set_num_threads64_'),
             ('scipy_openblas_get_num_threads', 'scipy_openblas_set_num_threads'),
             ('openblas_get_num_threads64_', 'openblas_set_num_threads64_'),
             ('openblas_get_num_threads', 'openblas_set_num_threads')]
    paths = []
    try:
        with open('/proc/self/maps') as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ''
                if 'openblas' in os.path.basename(path).lower() and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), 'numpy.libs')
    paths += [p for p in glob.glob(os.path.join(libdir, '*openblas*')) if p not in paths]
    # numpy's own copy first (scipy may bring a separate one).
    paths.sort(key=lambda p: 'numpy' not in p)
    mode = getattr(os, 'RTLD_NOLOAD', 0) | getattr(os, 'RTLD_LAZY', 1)
    for path in paths:
        try:
            lib = ctypes.CDLL(path, mode=mode)
        except OSError:
            continue
        for get_name, set_name in names:
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype = ctypes.c_int
                set_.argtypes = [ctypes.c_int]
                set_.restype = None
                return get, set_
    return None


@contextlib.contextmanager
def _single_threaded_blas():
    """numpy's OpenBLAS on one thread while any solve_rows call runs (reference
    counted, so concurrent calls restore the caller's setting once, at the end)."""
    global _blas_users, _blas_saved, _blas_api
    with _blas_lock:
        if _blas_api is None:
            try:
                _blas_api = _find_openblas() or False
            except Exception:   # noqa: BLE001 -- never let this optimization fail a solve
                _blas_api = False
        if _blas_api and _blas_users == 0:
            _blas_saved = _blas_api[0]()
            if _blas_saved > 1:
                _blas_api[1](1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_api and _blas_users == 0 and _blas_saved is not None and _blas_saved > 1:
                _blas_api[1](_blas_saved)

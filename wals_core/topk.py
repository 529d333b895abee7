"""Exact top-K items per query row by dot product: recommendations, similar items and
ranking metrics all use this one kernel.

Contract (`top_k`)
------------------
* scores[u, j] = float32(Σ_i q[u, i]·v[j, i]) (+ item_offsets[j] in float32), where
  q and v are the inputs cast to float32 and the sum is taken in float64 in index
  order i = 0, 1, ..., d-1 (every product of two float32 values is exact in
  float64). IEEE arithmetic fixes every bit of that: the scores, and so the ranking,
  are the same on every machine, BLAS build and CPU.
* Rank order: score descending, ties broken by the smaller item index. Output is
  (ids int64 n×k, scores float32 n×k).
* Never returned: the row's excluded items (CSR exclude_indptr/exclude_indices, e.g.
  the items a user rated in training) and items whose score is NaN or -inf (NaN is
  treated as -inf; an offset of -inf therefore removes an item from every row).
  When fewer than k items are left the row is padded with id -1 and score -inf.
  +inf scores are ordinary (largest) scores. -0.0 and +0.0 are equal (a tie).
* Deterministic: a row's result depends only on that row's query, the items, its
  exclusions and the offsets; not on the other rows of the call, their order,
  `num_threads` or the machine.

Why not BLAS's scores: a float32 sgemm sums in an order of its own, and OpenBLAS's
order depends on where a row sits in the call (its Haswell/Zen kernel rounds rows
6-11 and 18-31 of a 32-row call differently from rows 0-5, and columns by position
too: tests/test_topk.py shows it under OPENBLAS_CORETYPE=Haswell). A row's
recommendations would then change with the rows it was batched with, which differ
between runners and between a batch job and a one-user query.

How it is fast (the cost is the selection over n_queries × n_items scores, not the
matmul)
------------------------------------------------------------------------------
BLAS's float32 scores only choose candidates; the exact scores are computed for
those alone. Per batch of rows (_batch_rows: about _BATCH_ELEMENTS scores, so
the per-batch numpy calls are few next to the work and the scores stay in cache):
scores by sgemm into a reused buffer, excluded items set to -inf, then the best
kc = k + max(_EXTRA_MIN, k / 16) items by those scores:

1. items are cut into m groups of G (group g = items g, g + m, g + 2m, ...: a strided
   reshape, so the per-group maxima are one np.fmax.reduce over the middle axis);
2. t = the kc-th largest group maximum (np.partition over m values). kc groups hold
   an item scoring >= t, so the kc-th best score is >= t. If exactly kc groups reach
   t (the usual case), every other group is < t: the answer, ties included, lies in
   those kc groups;
3. exact selection among the kc·G candidates of the chosen groups, on an int64 key
   that orders by (score desc, index asc): the float32 score's bits made monotone in
   the high half, (2³²-1 - index) in the low half. np.partition then np.sort on the
   kc survivors; id and score are decoded back from the key (no gather);
4. a row where more than kc groups reach t (tied group maxima, or fewer than kc
   groups with a finite score) takes the whole-row path instead. Rare for
   real-valued factors; common for integer-valued test data.
5. Whatever order a BLAS sums in, |its score − the exact score| <= h_u, a bound from
   ‖q_u‖·max_j‖v_j‖ (_ExactScores). If the kc-th candidate's BLAS score is below the
   k-th's by more than 2·h_u, no item left out can reach the exact top k; the
   candidates get exact scores and the k best by those are the answer. Otherwise
   (near-ties around rank k, non-finite or huge queries) the row is scored exactly
   on every item. Items with a non-finite vector are always scored exactly.

When grouping cannot pay (kc·G > n_items / 2) every row takes the whole-row path.
Batches are spread over `num_threads` Python threads (numpy's matmul, reductions and
partitions release the GIL) with OpenBLAS on one thread (wals_core.solve's helper).

Many calls on the same items (a server): ItemLayout(items, offsets) does the
per-items work once (the float32 copy, non-finite items, norm bounds, the padded
transposed copy per group size); top_k(queries, layout, k) then gives the same bits.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from wals_core.solve import single_threaded_blas
from wals_core.sparse import check_csr

# Scores per matmul batch (float32: 4 MiB): rows = this / items, a power of two
# in [_BATCH_ROWS, _MAX_BATCH_ROWS]. Small catalogs get many rows per batch (each
# batch costs ~25 numpy calls whatever its size: with 1.7k items and 32 rows the
# calls' overhead was most of the time, and two threads serialized on it); large
# catalogs keep 32 rows. Speed only: the results do not depend on it.
_BATCH_ELEMENTS = 1 << 20
_BATCH_ROWS = 32
_MAX_BATCH_ROWS = 256
# Rows per thread-pool task (at least one batch; one scratch buffer per task).
_TASK_ROWS = 512
# Candidates per row beyond k from the BLAS phase: at least this many, or k / 16.
# More candidates cost selection time; fewer send more rows (near-ties within the
# error bound) to the exact whole-row path.
_EXTRA_MIN = 4
# Pairs rescored per step (float64 scratch of about 8 bytes each).
_RESCORE_ELEMENTS = 1 << 18
# Pairs × dimensions up to which the rescoring takes every product at once (512 KiB
# of float64 scratch): a few pairs cost the per-dimension loop's overhead otherwise.
_SMALL_RESCORE = 1 << 16
_LOW = np.int64(0xFFFFFFFF)
_NEG_INF = np.float32(-np.inf)


def _batch_rows(n_pad: int) -> int:
    """Rows per matmul batch for n_pad score columns (_BATCH_ELEMENTS)."""
    rows = _BATCH_ELEMENTS // max(n_pad, 1)
    return int(min(_MAX_BATCH_ROWS, max(_BATCH_ROWS, 2 ** round(np.log2(max(rows, 1))))))


def _group_size(n_items: int, k: int) -> int:
    """Items per group: about sqrt(n_items / k) (balances the m = n/G group maxima
    to partition against the k·G candidates to select from), a power of two in
    [8, 128]. Affects speed only, never results."""
    g = max(1.0, (n_items / max(k, 1)) ** 0.5)
    return int(min(128, max(8, 2 ** round(np.log2(g)))))


def _keys(scores: np.ndarray, low: np.ndarray) -> np.ndarray:
    """int64 keys ordered as (score desc, index asc) by ascending key value, from
    float32 scores and low = 2³²-1 - index; NaN becomes -inf, -0.0 becomes +0.0."""
    s = np.fmax(scores, _NEG_INF)   # a copy; NaN -> -inf
    s += np.float32(0.0)            # -0.0 -> +0.0
    bits = s.view(np.int32)
    # Monotone map float32 -> int32: negative floats have their magnitude bits flipped.
    bits ^= (bits >> 31) & np.int32(0x7FFFFFFF)
    keys = bits.astype(np.int64)
    keys <<= 32
    keys |= low
    return keys


def _decode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of keys; ids of -inf scores become -1."""
    mono = (keys >> 32).astype(np.int32)
    bits = np.where(mono < 0, mono ^ np.int32(0x7FFFFFFF), mono)
    scores = bits.view(np.float32)
    ids = _LOW - (keys & _LOW)
    ids[scores == _NEG_INF] = -1
    return ids, scores


def _largest(keys: np.ndarray, k: int) -> np.ndarray:
    """The k largest keys of each row, largest first."""
    c = keys.shape[1]
    if k < c:
        keys = np.partition(keys, c - k, axis=1)[:, c - k:]
    else:
        keys = keys.copy()
    keys.sort(axis=1)
    return keys[:, ::-1]


class ItemLayout:
    """The item side of top_k prepared once for many calls (a server answering many
    requests from one model): the float32 items and offsets, the items with a
    non-finite value, the largest item norm and offset, and per group size the padded
    transposed copy the BLAS phase multiplies by. top_k(queries, layout, k, ...) gives
    bit for bit what top_k(queries, items, k, item_offsets=offsets, ...) gives, without
    redoing that O(n_items x d) work on every call. The items must not change
    afterwards (the layout keeps copies)."""

    def __init__(self, items: np.ndarray, item_offsets: np.ndarray | None = None):
        v = np.array(items, dtype=np.float32, order='C')    # a copy: nobody changes it
        if v.ndim != 2:
            raise ValueError(f'items must be 2-d, got shape {v.shape}')
        if v.shape[0] >= 1 << 32:
            raise ValueError('at most 2**32 - 1 items')
        offsets = None
        if item_offsets is not None:
            offsets = np.array(item_offsets, dtype=np.float32).reshape(-1)
            if offsets.shape[0] != v.shape[0]:
                raise ValueError(f'item_offsets has {offsets.shape[0]} values for '
                                 f'{v.shape[0]} items')
        self.items, self.offsets = v, offsets
        self.bad = np.flatnonzero(~np.isfinite(v).all(axis=1))
        self.vmax, self.omax = _item_bounds(v, self.bad, offsets)
        self._padded: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def padded(self, n_pad: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(items transposed d x n_pad, offsets padded with -inf or None), made once."""
        out = self._padded.get(n_pad)
        if out is None:
            out = self._padded[n_pad] = _padded(self.items, self.offsets, self.bad, n_pad)
        return out


def _item_bounds(v: np.ndarray, bad: np.ndarray, offsets: np.ndarray | None
                 ) -> tuple[float, float]:
    """(largest norm of a finite item vector, largest |finite offset|)."""
    item_norm = np.sqrt(np.einsum('ij,ij->i', v, v, dtype=np.float64))
    item_norm[bad] = 0.0
    vmax = float(item_norm.max()) if len(item_norm) else 0.0
    omax = 0.0
    if offsets is not None:
        fin = offsets[np.isfinite(offsets)]
        omax = float(np.abs(fin).max()) if len(fin) else 0.0
    return vmax, omax


def _padded(v: np.ndarray, offsets: np.ndarray | None, bad: np.ndarray, n_pad: int
            ) -> tuple[np.ndarray, np.ndarray | None]:
    n_items, d = v.shape
    items_t = np.zeros((d, n_pad), dtype=np.float32)
    items_t[:, :n_items] = v.T
    off_pad = None
    if offsets is not None:   # -inf on padding and non-finite items, too
        off_pad = np.full(n_pad, _NEG_INF, dtype=np.float32)
        off_pad[:n_items] = offsets
        off_pad[bad] = _NEG_INF
    return items_t, off_pad


def top_k(queries: np.ndarray, items: np.ndarray | ItemLayout, k: int, *,
          exclude_indptr: np.ndarray | None = None,
          exclude_indices: np.ndarray | None = None,
          item_offsets: np.ndarray | None = None,
          num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best items of every query row: (ids int64 n×k, scores float32 n×k).

    queries: n × d; items: n_items × d (both cast to float32), or an ItemLayout of
    the items and their offsets (then item_offsets must be None).
    exclude_indptr (n + 1) / exclude_indices: row u never gets the items
    exclude_indices[exclude_indptr[u]:exclude_indptr[u + 1]] (duplicates allowed).
    item_offsets (n_items): added to every row's scores (e.g. item biases).
    num_threads: worker threads (default: the CPUs this process may run on); the
    results do not depend on it. See the module docstring for the full contract.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    layout = items if isinstance(items, ItemLayout) else None
    if layout is not None and item_offsets is not None:
        raise ValueError('an ItemLayout carries its own offsets: item_offsets must be None')
    v = layout.items if layout is not None else np.ascontiguousarray(items, dtype=np.float32)
    if q.ndim != 2 or v.ndim != 2 or q.shape[1] != v.shape[1]:
        raise ValueError(f'queries {q.shape} and items {v.shape} must be 2-d with the '
                         'same number of columns')
    k = int(k)
    if k < 0:
        raise ValueError(f'k must be >= 0, got {k}')
    n_q, d = q.shape
    n_items = v.shape[0]
    if n_items >= 1 << 32:
        raise ValueError('at most 2**32 - 1 items')
    indptr, indices = _exclusions(exclude_indptr, exclude_indices, n_q, n_items)
    offsets = layout.offsets if layout is not None else None
    if item_offsets is not None:
        offsets = np.asarray(item_offsets, dtype=np.float32).reshape(-1)
        if offsets.shape[0] != n_items:
            raise ValueError(f'item_offsets has {offsets.shape[0]} values for {n_items} items')

    out_ids = np.full((n_q, k), -1, dtype=np.int64)
    out_scores = np.full((n_q, k), _NEG_INF, dtype=np.float32)
    kk = min(k, n_items)   # columns beyond the catalog stay padding
    if n_q == 0 or kk == 0:
        return out_ids, out_scores

    # Items with a non-finite vector never become BLAS candidates: every row scores
    # them exactly (their BLAS scores could depend on the summation order).
    if layout is not None:
        bad, bounds = layout.bad, (layout.vmax, layout.omax)
    else:
        bad = np.flatnonzero(~np.isfinite(v).all(axis=1))
        bounds = _item_bounds(v, bad, offsets)
    n_good = n_items - len(bad)
    kc = min(n_good, kk + max(_EXTRA_MIN, kk // 16))   # candidates per row
    g = _group_size(n_items, kc)
    grouped = kc * g * 2 <= n_items
    if not grouped:
        g = 1
    m = -(-n_items // g)
    n_pad = m * g
    if layout is not None:
        items_t, off_pad = layout.padded(n_pad)
    else:
        items_t, off_pad = _padded(v, offsets, bad, n_pad)
    exact = _ExactScores(q, v, items_t, bad, bounds, offsets, indptr, indices)
    batch = _batch_rows(n_pad)
    low_all = None if grouped else _LOW - np.arange(n_items, dtype=np.int64)

    def candidates(r0: int, buf: np.ndarray, qbuf: np.ndarray,
                   cand: np.ndarray, sure: np.ndarray) -> None:
        """The kc best items of rows r0.. by BLAS scores into cand (ids, -1 where
        -inf); sure[r] = the row's k best by exact scores are among them."""
        r1 = min(r0 + batch, n_q)
        nb = r1 - r0
        if nb < batch:
            # A short batch (a server's few concurrent requests) multiplies only its
            # own rows, padded to a multiple of 4: sgemm's cost grows with the rows,
            # in steps (speed only: BLAS scores just pick candidates).
            rows = nb if nb <= 2 else min(-(-nb // 4) * 4, batch)
            qbuf[:nb] = q[r0:r1]
            qbuf[nb:rows] = 0.0
            qb = qbuf[:rows]
        else:
            qb = q[r0:r1]
        np.matmul(qb, items_t, out=buf[:len(qb)])
        s = buf[:nb]
        if off_pad is not None:
            s += off_pad
        else:   # padding and non-finite items never become candidates
            s[:, n_items:] = _NEG_INF
            s[:, exact.bad] = _NEG_INF
        if indptr is not None:   # rows r0..r1 are one run of the CSR: flat positions
            counts = np.diff(indptr[r0:r1 + 1])
            flat = np.repeat(np.arange(0, nb * n_pad, n_pad, dtype=np.int64), counts)
            flat += indices[indptr[r0]:indptr[r1]]
            s.reshape(-1)[flat] = _NEG_INF
        if grouped:
            top = _grouped_select(s, n_items, g, m, kc)
        else:
            top = _largest(_keys(s[:, :n_items], low_all), kc)
        ids, approx = _decode(top)
        cand[:nb] = ids
        ok = exact.row_ok[r0:r1].copy()
        if kc < n_good:
            # Every item left out scores <= approx[:, -1] by BLAS, so <= that + h
            # exactly; the kk-th candidate scores >= approx[:, kk-1] - h exactly.
            a_k = approx[:, kk - 1].astype(np.float64)
            a_last = approx[:, -1].astype(np.float64)
            ok &= (a_last == -np.inf) | (a_last < a_k - 2.0 * exact.half_gap[r0:r1])
        sure[:nb] = ok

    def run_task(t0: int) -> None:
        t1 = min(t0 + task_rows, n_q)
        buf = np.empty((min(batch, -(-(t1 - t0) // 4) * 4), n_pad), dtype=np.float32)
        qbuf = np.empty((batch, d), dtype=np.float32)
        cand = np.empty((t1 - t0, kc), dtype=np.int64)
        sure = np.empty(t1 - t0, dtype=bool)
        # 0 · inf = NaN and float32 overflow are part of the contract, not warnings.
        with np.errstate(invalid='ignore', over='ignore'):
            if kc > 0:
                for r0 in range(t0, t1, batch):
                    candidates(r0, buf, qbuf, cand[r0 - t0:], sure[r0 - t0:])
            else:
                sure[:] = exact.row_ok[t0:t1]
            rows = t0 + np.flatnonzero(sure)
            ids, sc = exact.best_of(rows, cand[sure], kk)
            out_ids[rows, :kk] = ids
            out_scores[rows, :kk] = sc
            rows = t0 + np.flatnonzero(~sure)
            if len(rows):
                ids, sc = exact.best_of(rows, None, kk)
                out_ids[rows, :kk] = ids
                out_scores[rows, :kk] = sc

    task_rows = -(-_TASK_ROWS // batch) * batch
    starts = range(0, n_q, task_rows)
    threads = max(1, min(num_threads or _cpus(), len(starts)))
    with single_threaded_blas():
        if threads == 1:
            for t0 in starts:
                run_task(t0)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for f in [pool.submit(run_task, t0) for t0 in starts]:
                    f.result()
    return out_ids, out_scores


class _ExactScores:
    """The contract's scores, float32(Σ_i q[u, i]·v[j, i] summed in float64 in index
    order) (+ offset in float32), for chosen (row, item) pairs; and the bound that
    lets BLAS's float32 scores pick the candidates.

    half_gap[u] bounds |BLAS score − exact score| of row u over every finite item,
    whatever order the BLAS sums in: |fl32 sum − exact| <= γ_d(2⁻²⁴)·Σ|q_i v_i|
    <= γ_d·‖q_u‖·max_j‖v_j‖ (Cauchy–Schwarz), the same in float64 for the exact
    score, plus the float32 roundings of the sums and of the offset addition and an
    absolute allowance for subnormals. row_ok is False where that bound is not
    finite or the scores could overflow float32 (such rows are scored exactly on
    every item)."""

    def __init__(self, q: np.ndarray, v: np.ndarray, items_t: np.ndarray,
                 bad: np.ndarray, bounds: tuple[float, float], offsets: np.ndarray | None,
                 indptr: np.ndarray | None, indices: np.ndarray | None) -> None:
        # float32 inputs only (no float64 copies of whole matrices): products are
        # taken in float64 on the pairs being scored. items_t: v transposed (d ×
        # n_pad, the BLAS phase's copy), so each dimension's values are contiguous.
        self.q, self.items_t, self.n_items = q, items_t, v.shape[0]
        self.offsets = offsets
        self.indptr, self.indices = indptr, indices
        d = q.shape[1]
        self.bad = bad   # items with a non-finite value
        vmax, omax = bounds   # _item_bounds: largest finite item norm and |offset|
        row_norm = np.sqrt(np.einsum('ij,ij->i', q, q, dtype=np.float64))
        u32, u64 = 2.0 ** -24, 2.0 ** -53
        gamma = d * u32 / (1 - d * u32) + d * u64 / (1 - d * u64)
        with np.errstate(invalid='ignore', over='ignore'):
            dot_max = row_norm * vmax
            self.half_gap = ((gamma + 4 * u32) * dot_max + 3 * u32 * omax
                             + (2 * d + 8) * 2.0 ** -149) * (1 + 1e-6)
            self.row_ok = (np.isfinite(self.half_gap)
                           & (dot_max + omax < float(np.finfo(np.float32).max) / 4))
        self.bad_pos = None
        if len(self.bad):
            self.bad_pos = np.full(self.n_items, -1, dtype=np.int64)
            self.bad_pos[self.bad] = np.arange(len(self.bad))

    def scores(self, rows: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        """float32 scores of rows × ids (ids: len(rows) × c, valid item indices; None:
        every item), offsets added; exclusions not applied."""
        q64 = self.q[rows].astype(np.float64)
        vt = self.items_t[:, :self.n_items]
        d = q64.shape[1]
        if ids is not None and d and ids.size * d <= _SMALL_RESCORE:
            # A few pairs (a server's batch): every product at once, then summed in
            # index order by cumsum (sequential by definition): the loop's exact
            # operations (0 + p_0 + p_1 + ...) without its per-dimension overhead.
            products = q64.T[:, :, None] * vt[:, ids]
            products[0] += 0.0        # the loop starts from +0: 0 + (-0) is +0
            acc = np.cumsum(products, axis=0)[-1]
        else:
            acc = np.zeros((len(rows), self.n_items if ids is None else ids.shape[1]))
            for i in range(d):   # index order: the contract's summation order
                # float64 × float32: the float32 value is widened exactly, and the
                # product of two float32 values is exact in float64.
                acc += q64[:, i, None] * (vt[i] if ids is None else np.take(vt[i], ids))
        out = acc.astype(np.float32)
        if self.offsets is not None:
            out += self.offsets if ids is None else self.offsets[ids]
        return out

    def best_of(self, rows: np.ndarray, cand: np.ndarray | None,
                k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best (ids, scores) of each row among its candidates (len(rows) × c,
        -1 = none; None: every item) and the non-finite items, by exact scores."""
        n_items = self.n_items
        ids_out = np.empty((len(rows), k), dtype=np.int64)
        sc_out = np.empty((len(rows), k), dtype=np.float32)
        width = n_items if cand is None else cand.shape[1] + len(self.bad)
        step = max(1, _RESCORE_ELEMENTS // max(width, 1))
        for c0 in range(0, len(rows), step):
            r = rows[c0:c0 + step]
            if cand is None:
                at, item = _exclusion_pairs(self.indptr, self.indices, r)
                s = self.scores(r, None)
                s[at, item] = _NEG_INF
                ids = None
                low = _LOW - np.arange(n_items, dtype=np.int64)
            else:
                ids = cand[c0:c0 + step]
                valid = ids >= 0
                ids = np.where(valid, ids, 0)
                s = self.scores(r, ids)
                s[~valid] = _NEG_INF   # excluded or -inf by BLAS: exact -inf (row_ok)
                if len(self.bad):   # candidates hold no excluded item; these may
                    at, item = _exclusion_pairs(self.indptr, self.indices, r)
                    sb = self.scores(r, np.broadcast_to(self.bad, (len(r), len(self.bad))))
                    hit = self.bad_pos[item] >= 0
                    sb[at[hit], self.bad_pos[item[hit]]] = _NEG_INF
                    s = np.concatenate([s, sb], axis=1)
                    ids = np.concatenate([ids, np.broadcast_to(self.bad, sb.shape)], axis=1)
                low = _LOW - ids
            ids_out[c0:c0 + step], sc_out[c0:c0 + step] = _decode(_largest(_keys(s, low), k))
        return ids_out, sc_out


def _grouped_select(s: np.ndarray, n_items: int, g: int, m: int, k: int) -> np.ndarray:
    """Top-k keys (largest first) of each row of s (nb × m·g scores, padding -inf),
    through the group-maximum bound (module docstring, steps 1-4)."""
    nb = s.shape[0]
    s3 = s.reshape(nb, g, m)
    gmax = np.fmax.reduce(s3, axis=1)    # fmax: NaN only if the whole group is NaN
    np.fmax(gmax, _NEG_INF, out=gmax)    # NaN -> -inf
    t = np.partition(gmax, m - k, axis=1)[:, m - k]
    chosen = gmax >= t[:, None]
    # Exactly k groups reach t: every other group is < t <= the k-th best score, so
    # the candidates hold the answer (ties included). Otherwise (groups tie at t, or
    # fewer than k groups have a finite score): the whole row.
    regular = np.count_nonzero(chosen, axis=1) == k
    rows = np.flatnonzero(regular) if not regular.all() else None
    if rows is not None:
        chosen = chosen[rows]
    groups = np.nonzero(chosen)[1].reshape(-1, k)     # row-major: k per row
    base = (np.arange(nb, dtype=np.int64) if rows is None else rows) * (m * g)
    cidx = (groups[:, :, None] + np.arange(0, m * g, m, dtype=np.int64)).reshape(-1, k * g)
    cand = np.take(s.reshape(-1), cidx + base[:, None])
    top_regular = _largest(_keys(cand, _LOW - cidx), k)
    if rows is None:
        return top_regular
    top = np.empty((nb, k), dtype=np.int64)
    top[rows] = top_regular
    redo = np.flatnonzero(~regular)
    top[redo] = _largest(_keys(s[redo, :n_items], _LOW - np.arange(n_items, dtype=np.int64)), k)
    return top


def _exclusion_pairs(indptr: np.ndarray | None, indices: np.ndarray | None,
                     rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in rows, item) of every exclusion of those rows (CSR)."""
    if indptr is None or not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo = indptr[rows]
    counts = indptr[rows + 1] - lo
    at = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
    start = np.repeat(lo - np.cumsum(counts) + counts, counts)
    return at, indices[start + np.arange(len(at), dtype=np.int64)]


def _exclusions(indptr, indices, n_q: int, n_items: int):
    if indptr is None and indices is None:
        return None, None
    if indptr is None or indices is None:
        raise ValueError('exclude_indptr and exclude_indices go together')
    indptr, indices = check_csr(indptr, indices, n_q, 'exclude', n_items)
    return indptr, indices


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def similar_items(items: np.ndarray, k: int, *, query_ids: np.ndarray | None = None,
                  num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k items most cosine-similar to each of `query_ids` (default: every item),
    never the item itself: (ids int64, similarities float32), each len(query_ids) × k,
    in top_k's rank order and padding.

    Rows are L2-normalized in float64 and then cast to float32. A zero vector stays
    zero: its similarity to every item is 0 (so a zero query gets the lowest-index
    items other than itself, all with similarity 0). NaN factors give NaN
    similarities, which top_k never returns.
    """
    x = np.asarray(items, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f'items must be 2-d, got shape {x.shape}')
    norms = np.sqrt(np.einsum('ij,ij->i', x, x))
    unit = np.divide(x, norms[:, None], out=np.zeros_like(x), where=norms[:, None] != 0)
    unit = unit.astype(np.float32)
    if query_ids is None:
        qid = np.arange(x.shape[0], dtype=np.int64)
    else:
        qid = np.asarray(query_ids, dtype=np.int64).reshape(-1)
        if len(qid) and (qid.min() < 0 or qid.max() >= x.shape[0]):
            raise ValueError(f'query_ids must be in [0, {x.shape[0]})')
    return top_k(unit[qid], unit, k,
                 exclude_indptr=np.arange(len(qid) + 1, dtype=np.int64),
                 exclude_indices=qid, num_threads=num_threads)

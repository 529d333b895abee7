"""Exact top-K items per query row by dot product: recommendations, similar items and
ranking metrics all use this one kernel.

Contract (`top_k`)
------------------
* scores[u, j] = queries[u] · items[j] (+ item_offsets[j]), computed in float32: the
  inputs are cast to float32 and multiplied by numpy's float32 matmul (sgemm); the
  offset is added in float32 afterwards.
* Rank order: score descending, ties broken by the smaller item index. Output is
  (ids int64 n×k, scores float32 n×k).
* Never returned: the row's excluded items (CSR exclude_indptr/exclude_indices, e.g.
  the items a user rated in training) and items whose score is NaN or -inf (NaN is
  treated as -inf; an offset of -inf therefore removes an item from every row).
  When fewer than k items are left the row is padded with id -1 and score -inf.
  +inf scores are ordinary (largest) scores. -0.0 and +0.0 are equal (a tie).
* Deterministic: a row's result depends only on that row's query, the items, its
  exclusions and the offsets; not on the other rows of the call, their order, or
  `num_threads`. Every matmul has the same shape (the last batch of rows is padded
  with zero rows to _BATCH_ROWS) and runs with BLAS on one thread, and every later
  step is exact (comparisons, maxima, selections). Bit-identical across machines
  only as far as their BLAS builds compute the same float32 dot products.

How it is fast (the cost is the selection over n_queries × n_items scores, not the
matmul)
------------------------------------------------------------------------------
Per batch of _BATCH_ROWS rows (its score matrix fits in L2 cache): scores by sgemm
into a reused buffer, excluded items set to -inf, then

1. items are cut into m groups of G (group g = items g, g + m, g + 2m, ...: a strided
   reshape, so the per-group maxima are G elementwise np.fmax passes);
2. t = the k-th largest group maximum (np.partition over m values). k groups hold
   an item scoring >= t, so the k-th best score is >= t. If exactly k groups reach t
   (the usual case), every other group is < t: the answer, ties included, lies in
   those k groups;
3. exact selection among the k·G candidates of the chosen groups, on an int64 key
   that orders by (score desc, index asc): the float32 score's bits made monotone in
   the high half, (2³²-1 - index) in the low half. np.partition then np.sort on the
   k survivors; id and score are decoded back from the key (no gather);
4. a row where more than k groups reach t (tied group maxima, or fewer than k groups
   with a finite score) takes the whole-row path instead. Rare for real-valued
   factors; common for integer-valued test data.

When grouping cannot pay (k·G >= n_items / 2) every row takes the whole-row path.
Batches are spread over `num_threads` Python threads (numpy's matmul, reductions and
partitions release the GIL) with OpenBLAS on one thread (wals_core.solve's helper).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from wals_core.solve import _single_threaded_blas

# Rows per matmul. Fixed (determinism: same sgemm shape for every row); 32 rows ×
# 10.7k items of float32 = 1.4 MB, inside a 2 MiB L2.
_BATCH_ROWS = 32
# Batches per thread-pool task (fewer tasks, one scratch buffer per task).
_TASK_BATCHES = 16
_LOW = np.int64(0xFFFFFFFF)
_NEG_INF = np.float32(-np.inf)


def _group_size(n_items: int, k: int) -> int:
    """Items per group: about sqrt(n_items / k) (balances the m = n/G group maxima
    to partition against the k·G candidates to select from), a power of two in
    [8, 128]. Affects speed only, never results."""
    g = max(1.0, (n_items / max(k, 1)) ** 0.5)
    return int(min(128, max(8, 2 ** round(np.log2(g)))))


def _keys(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    """int64 keys ordered as (score desc, index asc) by ascending key value; NaN
    becomes -inf, -0.0 becomes +0.0."""
    s = np.fmax(scores, _NEG_INF)   # NaN -> -inf
    s += np.float32(0.0)            # -0.0 -> +0.0
    bits = s.view(np.int32)
    # Monotone map float32 -> int32: negative floats have their magnitude bits flipped.
    mono = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)
    return (mono.astype(np.int64) << 32) | (_LOW - index)


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


def top_k(queries: np.ndarray, items: np.ndarray, k: int, *,
          exclude_indptr: np.ndarray | None = None,
          exclude_indices: np.ndarray | None = None,
          item_offsets: np.ndarray | None = None,
          num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best items of every query row: (ids int64 n×k, scores float32 n×k).

    queries: n × d; items: n_items × d (both cast to float32).
    exclude_indptr (n + 1) / exclude_indices: row u never gets the items
    exclude_indices[exclude_indptr[u]:exclude_indptr[u + 1]] (duplicates allowed).
    item_offsets (n_items): added to every row's scores (e.g. item biases).
    num_threads: worker threads (default: the CPUs this process may run on); the
    results do not depend on it. See the module docstring for the full contract.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    v = np.ascontiguousarray(items, dtype=np.float32)
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
    offsets = None
    if item_offsets is not None:
        offsets = np.asarray(item_offsets, dtype=np.float32).reshape(-1)
        if offsets.shape[0] != n_items:
            raise ValueError(f'item_offsets has {offsets.shape[0]} values for {n_items} items')

    out_ids = np.full((n_q, k), -1, dtype=np.int64)
    out_scores = np.full((n_q, k), _NEG_INF, dtype=np.float32)
    kk = min(k, n_items)   # columns beyond the catalog stay padding
    if n_q == 0 or kk == 0:
        return out_ids, out_scores

    g = _group_size(n_items, kk)
    grouped = kk * g * 2 <= n_items
    if not grouped:
        g = 1
    m = -(-n_items // g)
    n_pad = m * g
    items_t = np.zeros((d, n_pad), dtype=np.float32)
    items_t[:, :n_items] = v.T
    off_pad = None
    if offsets is not None:
        off_pad = np.zeros(n_pad, dtype=np.float32)
        off_pad[:n_items] = offsets

    def run_batch(r0: int, buf: np.ndarray, qbuf: np.ndarray) -> None:
        r1 = min(r0 + _BATCH_ROWS, n_q)
        nb = r1 - r0
        if nb < _BATCH_ROWS:   # same matmul shape for every batch
            qbuf[:nb] = q[r0:r1]
            qbuf[nb:] = 0.0
            qb = qbuf
        else:
            qb = q[r0:r1]
        np.matmul(qb, items_t, out=buf)
        s = buf[:nb]
        if off_pad is not None:
            s += off_pad
        s[:, n_items:] = _NEG_INF
        if indptr is not None:
            lo, hi = indptr[r0], indptr[r1]
            if hi > lo:
                rows = np.repeat(np.arange(nb, dtype=np.int64) * n_pad,
                                 np.diff(indptr[r0:r1 + 1]))
                s.reshape(-1)[rows + indices[lo:hi]] = _NEG_INF
        if grouped:
            top = _grouped_select(s, n_items, g, m, kk)
        else:
            top = _largest(_keys(s[:, :n_items], np.arange(n_items, dtype=np.int64)), kk)
        ids, sc = _decode(top)
        out_ids[r0:r1, :kk] = ids
        out_scores[r0:r1, :kk] = sc

    def run_task(t0: int) -> None:
        buf = np.empty((_BATCH_ROWS, n_pad), dtype=np.float32)
        qbuf = np.empty((_BATCH_ROWS, d), dtype=np.float32)
        # 0 · inf = NaN and float32 overflow are part of the contract, not warnings.
        with np.errstate(invalid='ignore', over='ignore'):
            for r0 in range(t0, min(t0 + _TASK_BATCHES * _BATCH_ROWS, n_q), _BATCH_ROWS):
                run_batch(r0, buf, qbuf)

    starts = range(0, n_q, _TASK_BATCHES * _BATCH_ROWS)
    threads = max(1, min(num_threads or _cpus(), len(starts)))
    with _single_threaded_blas():
        if threads == 1:
            for t0 in starts:
                run_task(t0)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for f in [pool.submit(run_task, t0) for t0 in starts]:
                    f.result()
    return out_ids, out_scores


def _grouped_select(s: np.ndarray, n_items: int, g: int, m: int, k: int) -> np.ndarray:
    """Top-k keys (largest first) of each row of s (nb × m·g scores, padding -inf),
    through the group-maximum bound (module docstring, steps 1-4)."""
    nb = s.shape[0]
    s3 = s.reshape(nb, g, m)
    gmax = s3[:, 0, :].copy()
    for r in range(1, g):
        np.fmax(gmax, s3[:, r, :], out=gmax)   # fmax: NaN only if the whole group is
    np.fmax(gmax, _NEG_INF, out=gmax)           # NaN -> -inf
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
    cand = s.reshape(-1)[(cidx + base[:, None]).reshape(-1)].reshape(-1, k * g)
    top_regular = _largest(_keys(cand, cidx), k)
    if rows is None:
        return top_regular
    top = np.empty((nb, k), dtype=np.int64)
    top[rows] = top_regular
    redo = np.flatnonzero(~regular)
    top[redo] = _largest(_keys(s[redo, :n_items], np.arange(n_items, dtype=np.int64)), k)
    return top


def _exclusions(indptr, indices, n_q: int, n_items: int):
    if indptr is None and indices is None:
        return None, None
    if indptr is None or indices is None:
        raise ValueError('exclude_indptr and exclude_indices go together')
    indptr = np.asarray(indptr, dtype=np.int64).reshape(-1)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indptr.shape[0] != n_q + 1:
        raise ValueError(f'exclude_indptr has {indptr.shape[0]} entries for {n_q} queries')
    if n_q and (indptr[0] < 0 or indptr[-1] > len(indices) or np.any(np.diff(indptr) < 0)):
        raise ValueError('exclude_indptr must be non-decreasing within exclude_indices')
    used = indices[indptr[0]:indptr[-1]] if n_q else indices[:0]
    if len(used) and (used.min() < 0 or used.max() >= n_items):
        raise ValueError(f'exclude_indices must be in [0, {n_items})')
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

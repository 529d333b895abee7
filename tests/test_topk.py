"""The top-K kernel against a brute-force full sort, and its determinism."""
from __future__ import annotations

import numpy as np
import pytest

from wals_core import topk as topk_module
from wals_core.topk import ItemLayout, similar_items, top_k


def brute_force(queries, items, k, exclude=None, offsets=None):
    """Full sort of every row's float32 scores by (score desc, index asc); excluded,
    NaN and -inf items dropped; padded with (-1, -inf). Scores computed one row at a
    time in float64 and rounded (the test data make every float32 sum exact)."""
    q = np.asarray(queries, np.float64)
    v = np.asarray(items, np.float64)
    n = v.shape[0]
    ids = np.full((q.shape[0], k), -1, np.int64)
    scores = np.full((q.shape[0], k), -np.inf, np.float32)
    for u in range(q.shape[0]):
        row = (v @ q[u]).astype(np.float32)
        if offsets is not None:
            row = row + np.asarray(offsets, np.float32)
        if exclude is not None:
            row[np.asarray(exclude[u], np.int64)] = -np.inf
        row[np.isnan(row)] = -np.inf
        order = np.lexsort((np.arange(n), -row.astype(np.float64)))
        order = order[row[order] > -np.inf][:k]
        ids[u, :len(order)] = order
        scores[u, :len(order)] = row[order]
    return ids, scores


def csr(lists):
    indptr = np.zeros(len(lists) + 1, np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    indices = np.concatenate([np.asarray(x, np.int64) for x in lists]) if lists else \
        np.zeros(0, np.int64)
    return indptr, indices


def random_case(rng, n_q, n_items, d, spread, seen_max=None):
    """Integer-valued factors in [-spread, spread]: float32 products and sums are
    exact, and a small spread makes many scores tie."""
    q = rng.integers(-spread, spread + 1, (n_q, d)).astype(np.float32)
    v = rng.integers(-spread, spread + 1, (n_items, d)).astype(np.float32)
    top = n_items if seen_max is None else seen_max
    seen = [rng.choice(n_items, int(rng.integers(0, top + 1)), replace=False)
            for _ in range(n_q)]
    return q, v, seen


def check(q, v, k, seen=None, offsets=None, **kw):
    indptr, indices = csr(seen) if seen is not None else (None, None)
    got_ids, got_scores = top_k(q, v, k, exclude_indptr=indptr, exclude_indices=indices,
                                item_offsets=offsets, **kw)
    want_ids, want_scores = brute_force(q, v, k, seen, offsets)
    assert got_ids.dtype == np.int64 and got_scores.dtype == np.float32
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_scores, want_scores)
    return got_ids, got_scores


@pytest.mark.parametrize('seed', range(12))
def test_small_cases_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_items = int(rng.integers(1, 120))
    q, v, seen = random_case(rng, int(rng.integers(1, 70)), n_items,
                             int(rng.integers(1, 5)), spread=2)
    seen[0] = np.arange(n_items)          # a user who has seen every item
    k = int(rng.choice([1, 2, 5, n_items, n_items + 3]))
    offsets = rng.integers(-1, 2, n_items).astype(np.float32) if seed % 2 else None
    check(q, v, k, seen, offsets)


@pytest.mark.parametrize('seed', range(8))
@pytest.mark.parametrize('spread', [1, 3, 1000])
def test_large_catalog_small_k(seed, spread):
    """n_items >> k: the group-maximum path, with tied group maxima (spread 1, 3:
    whole-row fallback) and mostly distinct scores (spread 1000: grouped path)."""
    rng = np.random.default_rng(1000 + seed)
    q, v, seen = random_case(rng, 150, int(rng.integers(500, 3000)), 4, spread, seen_max=200)
    k = int(rng.choice([1, 3, 10, 32]))
    offsets = rng.integers(-spread, spread + 1, v.shape[0]).astype(np.float32) \
        if seed % 2 else None
    check(q, v, k, seen, offsets)


def test_seen_everything_but_a_few_in_a_large_catalog():
    rng = np.random.default_rng(7)
    q, v, _ = random_case(rng, 40, 2000, 3, 1000)
    keep = [rng.choice(2000, c, replace=False) for c in rng.integers(0, 12, 40)]
    seen = [np.setdiff1d(np.arange(2000), kk) for kk in keep]
    ids, _ = check(q, v, 10, seen)
    assert ((ids >= 0).sum(axis=1) == [min(10, len(kk)) for kk in keep]).all()


def test_duplicate_exclusions_and_no_exclusions():
    rng = np.random.default_rng(3)
    q, v, _ = random_case(rng, 10, 50, 3, 2)
    seen = [np.r_[x, x] for x in (rng.choice(50, 5, replace=False) for _ in range(10))]
    check(q, v, 4, seen)
    check(q, v, 4)


def test_edge_shapes():
    rng = np.random.default_rng(4)
    q, v, _ = random_case(rng, 5, 8, 2, 2)
    for k in (0, 8, 20):
        check(q, v, k)
    ids, scores = top_k(np.zeros((0, 2)), v, 3)
    assert ids.shape == (0, 3) and scores.shape == (0, 3)
    ids, scores = top_k(q, np.zeros((0, 2)), 3)
    assert (ids == -1).all() and (scores == -np.inf).all() and ids.shape == (5, 3)
    ids, scores = top_k(np.zeros((3, 0)), np.zeros((4, 0)), 2)   # d = 0: all scores 0
    assert ids.tolist() == [[0, 1]] * 3 and (scores == 0).all()


def test_nan_inf_and_signed_zero():
    v = np.array([[1.0], [np.nan], [0.0], [-0.0], [np.inf], [2.0], [-np.inf]], np.float32)
    q = np.array([[1.0], [-1.0], [0.0]], np.float32)
    ids, scores = top_k(q, v, 7)
    # NaN and -inf scores are never returned; -0.0 ties with +0.0 (index order).
    assert ids[0].tolist() == [4, 5, 0, 2, 3, -1, -1]
    assert ids[1].tolist() == [6, 2, 3, 0, 5, -1, -1]   # -1 * inf = -inf: dropped
    # 0 * inf = NaN for items 4 and 6; the other scores are all 0.
    assert ids[2].tolist() == [0, 2, 3, 5, -1, -1, -1]
    assert not np.signbit(scores[ids >= 0][scores[ids >= 0] == 0]).any()
    ids, _ = top_k(q, v, 3, item_offsets=np.array([0, 0, -np.inf, 0, 0, 0, 0]))
    assert 2 not in ids


def test_real_valued_scores_match_float32_matmul():
    """Gaussian factors: scores equal numpy's float32 matmul to rounding and the
    ranking is the brute force's wherever scores are not within rounding."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((300, 16)).astype(np.float32)
    v = rng.standard_normal((4000, 16)).astype(np.float32)
    ids, scores = top_k(q, v, 10)
    full = q.astype(np.float64) @ v.T.astype(np.float64)
    want = np.argsort(-full, axis=1, kind='stable')[:, :10]
    np.testing.assert_allclose(scores, np.take_along_axis(full, ids, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), rtol=1e-5, atol=1e-5)
    assert (ids == want).mean() > 0.99
    assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize('spread, k', [(2, 10), (10**6, 10), (10**6, 3000)])
def test_rows_do_not_depend_on_batching_or_threads(spread, k):
    """Each row's result is bit-identical whatever rows share the call (different
    positions in the fixed-size matmul batches), in any order, on any thread count.
    Real-valued factors (spread 10**6 scaled down) exercise float32 rounding."""
    rng = np.random.default_rng(6)
    n_q = topk_module._TASK_ROWS * 2 + 37
    # d = 32, 3000 items (not a multiple of 16), k = 3000 (every score visible):
    # OpenBLAS's float32 products differ with a row's position in the call (Haswell
    # kernel) and in the last columns with the number of rows (AVX-512 kernel); the
    # exact rescoring must hide both. test_same_results_on_every_blas_kernel runs
    # this under each kernel.
    q, v, seen = random_case(rng, n_q, 3000, 32, spread, seen_max=100)
    if spread > 100:
        q = q / np.float32(spread * 3.7)
        v = v / np.float32(spread * 1.3)
    assert spread < 100 or len(np.unique(q)) > 1000   # real-valued: rounding happens
    indptr, indices = csr(seen)
    offsets = rng.standard_normal(3000).astype(np.float32)
    full = top_k(q, v, k, exclude_indptr=indptr, exclude_indices=indices,
                 item_offsets=offsets, num_threads=2)
    single = top_k(q, v, k, exclude_indptr=indptr, exclude_indices=indices,
                   item_offsets=offsets, num_threads=1)
    np.testing.assert_array_equal(full[0], single[0])
    np.testing.assert_array_equal(full[1], single[1])
    for rows in (rng.permutation(n_q)[:333], np.arange(5, n_q, 7), np.array([n_q - 1]),
                 rng.permutation(n_q)[:2], rng.permutation(n_q)[:31], np.arange(34) * 3,
                 rng.permutation(n_q)):
        sub_seen = [seen[r] for r in rows]
        sp, si = csr(sub_seen)
        ids, scores = top_k(q[rows], v, k, exclude_indptr=sp, exclude_indices=si,
                            item_offsets=offsets, num_threads=3)
        np.testing.assert_array_equal(ids, full[0][rows])
        np.testing.assert_array_equal(scores, full[1][rows])


@pytest.mark.parametrize('offsets_kind', ['none', 'finite', 'with -inf'])
def test_an_item_layout_gives_the_same_bits_as_the_arrays(offsets_kind):
    """ItemLayout (the item side prepared once, for a server) changes nothing: the
    same ids and score bits for grouped and whole-row k, batches of every size, NaN and
    inf items, exclusions; its padded copies are reused across calls; it keeps its own
    copy of the items."""
    rng = np.random.default_rng(12)
    q, v, seen = random_case(rng, 300, 2000, 16, 10**6, seen_max=60)
    q, v = q / np.float32(3.7e6), v / np.float32(1.3e6)
    v[7] = np.nan
    v[11, 3] = np.inf
    offsets = None
    if offsets_kind != 'none':
        offsets = rng.standard_normal(2000).astype(np.float32)
        if offsets_kind == 'with -inf':
            offsets[[0, 5, 1999]] = -np.inf
    layout = ItemLayout(v, offsets)
    indptr, indices = csr(seen)
    for k in (1, 10, 40, 700, 2500):
        want = top_k(q, v, k, exclude_indptr=indptr, exclude_indices=indices,
                     item_offsets=offsets, num_threads=1)
        for rows in (np.arange(300), np.array([17]), np.arange(0, 300, 9)):
            sp, si = csr([seen[r] for r in rows])
            got = top_k(q[rows], layout, k, exclude_indptr=sp, exclude_indices=si,
                        num_threads=2)
            np.testing.assert_array_equal(got[0], want[0][rows])
            np.testing.assert_array_equal(got[1].view(np.int32), want[1][rows].view(np.int32))
    assert 1 <= len(layout._padded) <= 5
    v[:] = 0.0                      # the caller's array changes; the layout does not
    again = top_k(q[:3], layout, 10, num_threads=1)
    assert not (again[1] == 0).all()
    with pytest.raises(ValueError, match='item_offsets must be None'):
        top_k(q, layout, 5, item_offsets=np.zeros(2000, np.float32))
    with pytest.raises(ValueError, match='same number of columns'):
        top_k(q[:, :3], layout, 5)


def test_similar_items():
    rng = np.random.default_rng(8)
    v = rng.standard_normal((500, 6))
    v[7] = 0.0                                   # a zero vector
    ids, sims = similar_items(v, 5)
    assert ids.shape == (500, 5)
    assert not (ids == np.arange(500)[:, None]).any()        # never itself
    unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    np.testing.assert_allclose(sims, -np.sort(-cos, axis=1)[:, :5], atol=1e-6)
    assert ids[7].tolist() == [0, 1, 2, 3, 4] and (sims[7] == 0).all()
    # query_ids: the same rows as the full answer.
    qid = np.array([7, 3, 499, 3])
    sub = similar_items(v, 5, query_ids=qid)
    np.testing.assert_array_equal(sub[0], ids[qid])
    np.testing.assert_array_equal(sub[1], sims[qid])
    # k larger than the catalog minus the item itself: padded.
    ids_small, _ = similar_items(v[:3], 5)
    assert (ids_small[:, 2:] == -1).all() and (ids_small[:, :2] >= 0).all()


def test_bad_arguments():
    v = np.zeros((4, 2))
    with pytest.raises(ValueError):
        top_k(np.zeros((2, 3)), v, 1)
    with pytest.raises(ValueError):
        top_k(np.zeros((2, 2)), v, -1)
    with pytest.raises(ValueError):
        top_k(np.zeros((2, 2)), v, 1, exclude_indptr=np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        top_k(np.zeros((2, 2)), v, 1, exclude_indptr=np.array([0, 1]),
              exclude_indices=np.array([0]))
    with pytest.raises(ValueError):
        top_k(np.zeros((2, 2)), v, 1, exclude_indptr=np.array([0, 1, 2]),
              exclude_indices=np.array([0, 4]))
    with pytest.raises(ValueError):
        top_k(np.zeros((2, 2)), v, 1, item_offsets=np.zeros(3))
    with pytest.raises(ValueError):
        similar_items(v, 1, query_ids=np.array([4]))


def exact_reference(queries, items, k, exclude=None, offsets=None):
    """The contract's scores, written out: float64 sum in index order, then float32,
    then + offset in float32; full sort by (score desc, index asc)."""
    q = np.asarray(queries, np.float32).astype(np.float64)
    v = np.asarray(items, np.float32).astype(np.float64)
    acc = np.zeros((q.shape[0], v.shape[0]))
    with np.errstate(invalid='ignore', over='ignore'):
        for i in range(q.shape[1]):
            acc += q[:, i, None] * v[None, :, i]
        full = acc.astype(np.float32)
        if offsets is not None:
            full += np.asarray(offsets, np.float32)
    ids = np.full((q.shape[0], k), -1, np.int64)
    scores = np.full((q.shape[0], k), -np.inf, np.float32)
    for u in range(q.shape[0]):
        row = full[u].copy()
        if exclude is not None:
            row[np.asarray(exclude[u], np.int64)] = -np.inf
        row[np.isnan(row)] = -np.inf
        order = np.lexsort((np.arange(len(row)), -row.astype(np.float64)))
        order = order[row[order] > -np.inf][:k]
        ids[u, :len(order)] = order
        scores[u, :len(order)] = row[order]
    return ids, scores


def real_case(rng, n_q, n_items, d):
    q = (rng.standard_normal((n_q, d)) * rng.uniform(0.1, 3, (n_q, 1))).astype(np.float32)
    v = (rng.standard_normal((n_items, d)) * rng.uniform(0.1, 3, (n_items, 1))).astype(np.float32)
    seen = [rng.choice(n_items, int(rng.integers(0, 60)), replace=False) for _ in range(n_q)]
    return q, v, seen


@pytest.mark.parametrize('seed', range(6))
def test_real_valued_scores_are_the_contracts_exact_sum(seed):
    """Real-valued factors (rounding everywhere): ids and scores equal the contract's
    index-order float64 sum bit for bit, grouped path (small k) and whole-row path."""
    rng = np.random.default_rng(50 + seed)
    q, v, seen = real_case(rng, 700, int(rng.integers(800, 4000)), int(rng.integers(3, 70)))
    offsets = rng.standard_normal(v.shape[0]).astype(np.float32) if seed % 2 else None
    k = [1, 10, 100, 500, 7, 40][seed]
    indptr, indices = csr(seen)
    got = top_k(q, v, k, exclude_indptr=indptr, exclude_indices=indices, item_offsets=offsets)
    want = exact_reference(q, v, k, seen, offsets)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_near_ties_and_non_finite_inputs_take_the_exact_paths():
    """Duplicated item vectors (exact ties across rank k: the candidates cannot be
    trusted), items with inf/NaN, queries whose float32 scores overflow, a zero
    query: all equal the contract's exact reference."""
    rng = np.random.default_rng(60)
    q, v, seen = real_case(rng, 300, 2000, 16)
    v[1000:1400] = v[0]                      # 401 identical items
    v[7, 3] = np.inf
    v[8, 0] = np.nan
    q[5] = 0.0
    q[6, 2] = np.float32(3e38)               # float32 sums overflow, float64 does not
    q[9, 1] = -np.inf
    q[10:40] = v[0] * np.float32(1.5)        # these rows rank the duplicates first
    indptr, indices = csr(seen)
    for k in (5, 10, 450):
        got = top_k(q, v, k, exclude_indptr=indptr, exclude_indices=indices)
        want = exact_reference(q, v, k, seen)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def _blas_kernels():
    """OpenBLAS kernels this CPU can run (numpy's OpenBLAS picks one at start-up,
    OPENBLAS_CORETYPE overrides it)."""
    try:
        flags = open('/proc/cpuinfo').read()
    except OSError:
        return []
    if ' sse3' not in flags and ' pni' not in flags:
        return []
    kernels = ['Prescott']
    if ' avx2' in flags and ' fma' in flags:
        kernels.append('Haswell')
    if ' avx512f' in flags and ' avx512bw' in flags:
        kernels.append('SkylakeX')
    return kernels


_KERNEL_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from wals_core.topk import top_k
rng = np.random.default_rng(6)
q = (rng.standard_normal((1500, 32)) / 3.7).astype(np.float32)
v = (rng.standard_normal((3000, 32)) / 1.3).astype(np.float32)
off = rng.standard_normal(3000).astype(np.float32)
parts = []
for k in (10, 3000):
    full = top_k(q, v, k, item_offsets=off, num_threads=2)
    rows = rng.permutation(1500)[:31]
    sub = top_k(q[rows], v, k, item_offsets=off, num_threads=1)
    assert (sub[0] == full[0][rows]).all() and (sub[1] == full[1][rows]).all(), k
    parts += [full[0].tobytes(), full[1].tobytes()]
import hashlib
print(hashlib.sha256(b''.join(parts)).hexdigest())
"""


def test_same_results_on_every_blas_kernel():
    """The same call under each OpenBLAS kernel the CPU runs (their float32 sgemm
    results differ): identical bytes, and a subset of rows gets the same answer as
    in the full call. BLAS's own scores differ between these kernels; this test
    failed before the exact rescoring."""
    import os
    import subprocess
    import sys
    kernels = _blas_kernels()
    if len(kernels) < 2:
        pytest.skip('fewer than two OpenBLAS kernels run on this CPU')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = {}
    for kernel in kernels:
        env = dict(os.environ, OPENBLAS_CORETYPE=kernel)
        out = subprocess.run([sys.executable, '-c', _KERNEL_SCRIPT, root], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (kernel, out.stderr[-2000:])
        digests[kernel] = out.stdout.strip()
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize('seed', range(4))
def test_few_pairs_rescored_at_once_give_the_loops_bits(seed, monkeypatch):
    """A server's small batches rescore their candidates with every product at once
    (_SMALL_RESCORE); the bits equal the per-dimension loop's, signed zeros, infinities
    and NaN products included."""
    rng = np.random.default_rng(90 + seed)
    q, v, seen = real_case(rng, 40, 900, [3, 16, 32, 50][seed])
    q[rng.random(q.shape) < 0.2] = -0.0
    v[rng.random(v.shape) < 0.2] = 0.0
    q[3] = -0.0                                      # every product a signed zero
    v[[5, 17]] = np.inf
    v[29, 0] = np.nan
    q[7, 0] = np.float32(3e38)
    offsets = rng.standard_normal(900).astype(np.float32) if seed % 2 else None
    indptr, indices = csr(seen)
    small = [top_k(q[r:r + 1], v, 10, exclude_indptr=[0, len(seen[r])],
                   exclude_indices=seen[r], item_offsets=offsets) for r in range(len(q))]
    monkeypatch.setattr(topk_module, '_SMALL_RESCORE', -1)    # the loop everywhere
    loop = top_k(q, v, 10, exclude_indptr=indptr, exclude_indices=indices,
                 item_offsets=offsets)
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in small]), loop[0])
    np.testing.assert_array_equal(np.concatenate([s for _, s in small]).view(np.uint32),
                                  loop[1].view(np.uint32))


def test_few_pairs_are_summed_in_index_order(monkeypatch):
    """The order matters where float64 loses digits: (2^60 - 2^60) + 1 is 1, while
    2^60 + (-2^60 + 1) would be 0. Both rescoring paths give the index-order sum."""
    v = np.array([[2.0 ** 60, -2.0 ** 60, 1.0], [1.0, 2.0 ** 60, -2.0 ** 60],
                  [3.0, 0.5, 0.25]], np.float32)
    q = np.ones((2, 3), np.float32)
    exact = topk_module._ExactScores(q, v, np.ascontiguousarray(v.T), np.zeros(0, np.int64),
                                     (float(np.abs(v).max()) * 2, 0.0), None, None, None)
    ids = np.array([[0, 1, 2], [2, 1, 0]])
    want = [[1.0, 0.0, 3.75], [3.75, 0.0, 1.0]]
    assert exact.scores(np.arange(2), ids).tolist() == want
    monkeypatch.setattr(topk_module, '_SMALL_RESCORE', -1)
    assert exact.scores(np.arange(2), ids).tolist() == want


@pytest.mark.parametrize('k', [5, 400])
def test_batch_and_task_sizes_change_nothing(monkeypatch, k):
    """Rows per matmul batch (32..256, from the catalog size) and rows per thread
    task are speed settings: every choice gives the same ids and score bits."""
    rng = np.random.default_rng(21)
    q, v, seen = random_case(rng, 700, 1500, 12, 10**6, seen_max=80)
    q, v = q / np.float32(3.7e6), v / np.float32(1.3e6)
    indptr, indices = csr(seen)
    offsets = rng.standard_normal(1500).astype(np.float32)
    results = []
    for elements, task_rows in [(1, 64), (1 << 20, 512), (1 << 30, 100), (1 << 17, 1)]:
        monkeypatch.setattr(topk_module, '_BATCH_ELEMENTS', elements)
        monkeypatch.setattr(topk_module, '_TASK_ROWS', task_rows)
        results.append((topk_module._batch_rows(1500), top_k(
            q, v, k, exclude_indptr=indptr, exclude_indices=indices, item_offsets=offsets,
            num_threads=2)))
    assert sorted({rows for rows, _ in results}) == [32, 64, 256]
    for _, (ids, scores) in results[1:]:
        np.testing.assert_array_equal(ids, results[0][1][0])
        np.testing.assert_array_equal(scores, results[0][1][1])

"""The top-K kernel against a brute-force full sort, and its determinism."""
from __future__ import annotations

import numpy as np
import pytest

from wals_core import topk as topk_module
from wals_core.topk import similar_items, top_k


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


@pytest.mark.parametrize('spread', [2, 10**6])
def test_rows_do_not_depend_on_batching_or_threads(spread):
    """Each row's result is bit-identical whatever rows share the call (different
    positions in the fixed-size matmul batches), in any order, on any thread count.
    Real-valued factors (spread 10**6 scaled down) exercise float32 rounding."""
    rng = np.random.default_rng(6)
    n_q = topk_module._BATCH_ROWS * topk_module._TASK_BATCHES * 2 + 37
    q, v, seen = random_case(rng, n_q, 3000, 8, spread, seen_max=100)
    if spread > 100:
        q = q / np.float32(spread * 3.7)
        v = v / np.float32(spread * 1.3)
    indptr, indices = csr(seen)
    offsets = rng.standard_normal(3000).astype(np.float32)
    full = top_k(q, v, 10, exclude_indptr=indptr, exclude_indices=indices,
                 item_offsets=offsets, num_threads=2)
    single = top_k(q, v, 10, exclude_indptr=indptr, exclude_indices=indices,
                   item_offsets=offsets, num_threads=1)
    np.testing.assert_array_equal(full[0], single[0])
    np.testing.assert_array_equal(full[1], single[1])
    for rows in (rng.permutation(n_q)[:333], np.arange(5, n_q, 7), np.array([n_q - 1]),
                 rng.permutation(n_q)):
        sub_seen = [seen[r] for r in rows]
        sp, si = csr(sub_seen)
        ids, scores = top_k(q[rows], v, 10, exclude_indptr=sp, exclude_indices=si,
                            item_offsets=offsets, num_threads=3)
        np.testing.assert_array_equal(ids, full[0][rows])
        np.testing.assert_array_equal(scores, full[1][rows])


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

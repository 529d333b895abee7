"""Ranking metrics against a naive per-user loop and a hand-computed case."""
from __future__ import annotations

import math

import numpy as np
import pytest

from wals_core.ranking import RankingSums, rank_and_score, ranking_sums
from wals_core.topk import top_k


def naive_metrics(top_lists, relevant_lists, k):
    """implicit's ranking_metrics_at_k loop, user by user, plus recall."""
    hits_total = pr_div = 0
    ap_total = ndcg_total = recall_total = 0.0
    users = 0
    for top, rel in zip(top_lists, relevant_lists):
        likes = set(int(x) for x in rel)
        if not likes:
            continue
        users += 1
        pr_div += min(k, len(likes))
        idcg = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(likes))))
        hit = 0
        ap = dcg = 0.0
        for i in range(k):
            item = int(top[i]) if i < len(top) else -1
            if item != -1 and item in likes:
                hit += 1
                ap += hit / (i + 1)
                dcg += 1.0 / math.log2(i + 2)
        hits_total += hit
        ap_total += ap / min(k, len(likes))
        ndcg_total += dcg / idcg
        recall_total += hit / len(likes)
    if not users:
        return {'precision_at_k': None, 'recall_at_k': None, 'map_at_k': None,
                'ndcg_at_k': None, 'ranking_users': 0}
    return {'precision_at_k': hits_total / pr_div, 'recall_at_k': recall_total / users,
            'map_at_k': ap_total / users, 'ndcg_at_k': ndcg_total / users,
            'ranking_users': users}


def to_csr(lists):
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    indices = np.concatenate([np.asarray(x, np.int64) for x in lists]) if lists else \
        np.zeros(0, np.int64)
    return indptr, indices


def assert_metrics_equal(got, want):
    assert got['ranking_users'] == want['ranking_users']
    for key in ('precision_at_k', 'recall_at_k', 'map_at_k', 'ndcg_at_k'):
        if want[key] is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), key


def test_hand_computed_case():
    top = np.array([[1, 2, 4],      # relevant {1, 4}: hits at ranks 0 and 2
                    [3, -1, -1],    # relevant {0}: no hit, padded list
                    [5, 6, 7]],     # no relevant items: not evaluated
                   dtype=np.int64)
    indptr, indices = to_csr([[4, 1, 4], [0], []])   # duplicate 4 counts once
    s = ranking_sums(top, indptr, indices, 3).summary(3)
    assert s['ranking_users'] == 2
    assert s['precision_at_k'] == pytest.approx(2 / (2 + 1))
    assert s['recall_at_k'] == pytest.approx((1.0 + 0.0) / 2)
    assert s['map_at_k'] == pytest.approx(((1 / 1 + 2 / 3) / 2 + 0.0) / 2)
    ndcg0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert s['ndcg_at_k'] == pytest.approx((ndcg0 + 0.0) / 2)


def test_more_relevant_than_k():
    # 5 relevant items, k = 2, both recommended items relevant: precision, MAP, NDCG 1
    # (denominator min(k, |rel|)); recall 2 / 5.
    s = ranking_sums(np.array([[3, 1]]), *to_csr([[0, 1, 2, 3, 4]]), 2).summary()
    assert s == {'precision_at_k': 1.0, 'recall_at_k': 0.4, 'map_at_k': 1.0,
                 'ndcg_at_k': pytest.approx(1.0), 'ranking_users': 1}


@pytest.mark.parametrize('seed', range(6))
def test_against_naive_loop_on_kernel_output(seed):
    """Random integer factors (many tied scores), seen items excluded (some users
    have seen everything), test items overlapping the seen ones, users without test
    items, K sometimes larger than the catalog."""
    rng = np.random.default_rng(seed)
    n_users, n_items, d = int(rng.integers(1, 60)), int(rng.integers(1, 40)), 3
    k = int(rng.choice([1, 3, 10, n_items, n_items + 5]))
    u = rng.integers(-2, 3, (n_users, d)).astype(np.float32)
    v = rng.integers(-2, 3, (n_items, d)).astype(np.float32)
    seen = [rng.choice(n_items, int(rng.integers(0, n_items + 1)), replace=False)
            for _ in range(n_users)]
    seen[0] = np.arange(n_items)   # every item seen
    test = [rng.integers(0, n_items, int(rng.integers(0, 6))) for _ in range(n_users)]
    test[-1] = np.zeros(0, np.int64)   # no test items
    ids, _ = top_k(u, v, k, exclude_indptr=to_csr(seen)[0],
                   exclude_indices=to_csr(seen)[1])
    got = ranking_sums(ids, *to_csr(test), k).summary(k)
    assert_metrics_equal(got, naive_metrics(ids.tolist(), test, k))


@pytest.mark.parametrize('seed', range(4))
def test_blocks_add_up(seed):
    rng = np.random.default_rng(100 + seed)
    n, n_items, k = 50, 30, 5
    top = np.where(rng.random((n, k)) < 0.1, -1, rng.integers(0, n_items, (n, k)))
    rel = [rng.integers(0, n_items, int(rng.integers(0, 8))) for _ in range(n)]
    cuts = np.sort(rng.choice(np.arange(1, n), 3, replace=False))
    total = RankingSums(k=k)
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n]):
        total = total.add(ranking_sums(top[lo:hi], *to_csr(rel[lo:hi]), k))
    assert_metrics_equal(total.summary(k), naive_metrics(top.tolist(), rel, k))
    whole = ranking_sums(top, *to_csr(rel), k)
    assert (total.users, total.hits, total.precision_denominator) == (
        whole.users, whole.hits, whole.precision_denominator)


def test_lists_shorter_or_longer_than_k():
    top = np.array([[2, 0, 1, 3]])
    rel = to_csr([[1, 3]])
    assert_metrics_equal(ranking_sums(top, *rel, 2).summary(), naive_metrics([[2, 0]], [[1, 3]], 2))
    assert_metrics_equal(ranking_sums(top[:, :1], *rel, 3).summary(),
                         naive_metrics([[2]], [[1, 3]], 3))


def test_no_users_or_no_relevant_items():
    empty = ranking_sums(np.zeros((0, 3), np.int64), np.zeros(1, np.int64),
                         np.zeros(0, np.int64), 3)
    assert empty == RankingSums(k=3)
    none = ranking_sums(np.array([[0, 1, 2]]), np.zeros(2, np.int64), np.zeros(0, np.int64), 3)
    assert none.summary() == {'precision_at_k': None, 'recall_at_k': None,
                              'map_at_k': None, 'ndcg_at_k': None, 'ranking_users': 0}


def test_bad_arguments():
    with pytest.raises(ValueError):
        ranking_sums(np.zeros((2, 3), np.int64), np.zeros(2, np.int64), np.zeros(0), 3)
    with pytest.raises(ValueError):
        ranking_sums(np.zeros((1, 3), np.int64), np.zeros(2, np.int64), np.zeros(0), 0)
    with pytest.raises(ValueError):
        RankingSums(k=3).add(RankingSums(k=4))
    with pytest.raises(ValueError):
        RankingSums(k=3).summary(4)


def naive_top(u, v, k, seen, offsets=None):
    """Top-k item lists by brute force: float64 scores, seen items left out, ties to
    the smaller index."""
    out = []
    for q, excluded in zip(u.astype(np.float64), seen):
        score = v.astype(np.float64) @ q + (0.0 if offsets is None else offsets)
        order = sorted((j for j in range(len(v)) if j not in set(excluded.tolist())),
                       key=lambda j: (-score[j], j))
        out.append(order[:k])
    return out


@pytest.mark.parametrize('seed', range(4))
def test_rank_and_score_is_the_naive_ranking_and_metrics(seed):
    """The one ranking evaluation of the trainer, the comparison, the tuner and the
    benchmark: users' unseen items ranked, hits scored against relevant pairs given
    in any order (duplicates too); users without relevant items are not ranked."""
    rng = np.random.default_rng(200 + seed)
    n_users, n_items, d, k = 40, 25, 4, 5
    u = rng.normal(size=(n_users, d)).astype(np.float32)
    v = rng.normal(size=(n_items, d)).astype(np.float32)
    offsets = rng.normal(size=n_items).astype(np.float32) if seed % 2 else None
    seen = [rng.choice(n_items, int(rng.integers(0, 10)), replace=False)
            for _ in range(n_users)]
    rel_rows = rng.integers(0, n_users, 60)
    rel_rows[rel_rows == 3] = 4                 # user 3 has no relevant item
    rel_cols = rng.integers(0, n_items, 60)
    got = rank_and_score(u, v, k, rel_rows, rel_cols, *to_csr(seen), item_offsets=offsets)
    relevant = [rel_cols[rel_rows == i] for i in range(n_users)]
    want = naive_metrics(naive_top(u, v, k, seen, offsets), relevant, k)
    assert_metrics_equal(got.summary(k), want)
    assert got.users == len(set(rel_rows.tolist()))
    # Pairs in another order: the same sums, to the bit.
    order = rng.permutation(len(rel_rows))
    assert rank_and_score(u, v, k, rel_rows[order], rel_cols[order], *to_csr(seen),
                          item_offsets=offsets) == got


def test_rank_and_score_without_relevant_pairs_and_bad_rows():
    u, v = np.ones((3, 2), np.float32), np.ones((4, 2), np.float32)
    empty = rank_and_score(u, v, 2, [], [], *to_csr([[], [], []]))
    assert empty == RankingSums(k=2)
    with pytest.raises(ValueError, match='relevant_rows'):
        rank_and_score(u, v, 2, [3], [0], *to_csr([[], [], []]))

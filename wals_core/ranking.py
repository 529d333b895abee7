"""Ranking metrics at K (precision, recall, MAP, NDCG) of top-K lists against each
user's relevant items, as additive sums so that they can be computed per user block
and combined (summed in block order: deterministic).

Conventions: those of `implicit.evaluation.ranking_metrics_at_k` (implicit 0.7.x,
evaluation.pyx), so that the numbers compare with that library:
* Only users with at least one relevant item count (implicit skips users without
  test items); their relevant items are a set (duplicates count once).
* The top-K list of a user is their K recommended items, rank i = 0 .. K-1, with the
  training items excluded (implicit's `recommend` filters already-liked items; here
  the caller passes lists from `wals_core.topk.top_k` with those exclusions). A
  padding id (-1, when fewer than K items could be recommended) is never a hit.
* precision@K = Σ_u hits_u / Σ_u min(K, |rel_u|): micro-averaged, one ratio of sums
  (implicit's `relevant / pr_div`), not a mean of per-user precisions.
* MAP@K = mean over users of ap_u / min(K, |rel_u|), with ap_u = Σ over hit ranks i
  of (hits at ranks <= i) / (i + 1) (implicit's `ap += hit / (i + 1)`).
* NDCG@K = mean over users of dcg_u / idcg_u, dcg_u = Σ over hit ranks i of
  1 / log2(i + 2), idcg_u = Σ_{i < min(K, |rel_u|)} 1 / log2(i + 2) (implicit's
  `cg[i] / cg_sum[min(K, likes.size()) - 1]`).
* recall@K = mean over users of hits_u / |rel_u|: NOT in implicit (no min(K, ·) in
  the denominator, so it is below 1 when a user has more than K relevant items).
* implicit's AUC is not computed.
A user whose relevant items are all among their excluded (training) items, or who
has fewer than K recommendable items, still counts with these denominators, as in
implicit.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from wals_core.sparse import check_csr, select_rows, sorted_unique
from wals_core.sums import fixed_sum
from wals_core.topk import top_k


@dataclasses.dataclass(frozen=True)
class RankingSums:
    """Additive sums of the ranking metrics at `k` over a set of users."""
    k: int
    users: int = 0                    # users with >= 1 relevant item
    hits: int = 0                     # Σ_u hits_u
    precision_denominator: int = 0    # Σ_u min(k, |rel_u|)
    ap_sum: float = 0.0               # Σ_u ap_u / min(k, |rel_u|)
    ndcg_sum: float = 0.0             # Σ_u dcg_u / idcg_u
    recall_sum: float = 0.0           # Σ_u hits_u / |rel_u|

    def add(self, other: RankingSums) -> RankingSums:
        """The sums over both sets of users (self's users first)."""
        if other.k != self.k:
            raise ValueError(f'cannot add ranking sums at k={other.k} to k={self.k}')
        return RankingSums(
            k=self.k, users=self.users + other.users, hits=self.hits + other.hits,
            precision_denominator=self.precision_denominator + other.precision_denominator,
            ap_sum=self.ap_sum + other.ap_sum, ndcg_sum=self.ndcg_sum + other.ndcg_sum,
            recall_sum=self.recall_sum + other.recall_sum)

    def summary(self, k: int | None = None) -> dict:
        """{precision_at_k, recall_at_k, map_at_k, ndcg_at_k, ranking_users}; the
        metrics are None when no user had a relevant item. k, if given, must be the
        sums' k."""
        if k is not None and int(k) != self.k:
            raise ValueError(f'these ranking sums are at k={self.k}, not {k}')
        n = self.users
        return {
            'precision_at_k': self.hits / self.precision_denominator if n else None,
            'recall_at_k': self.recall_sum / n if n else None,
            'map_at_k': self.ap_sum / n if n else None,
            'ndcg_at_k': self.ndcg_sum / n if n else None,
            'ranking_users': n,
        }


def ranking_sums(top_ids: np.ndarray, relevant_indptr: np.ndarray,
                 relevant_indices: np.ndarray, k: int) -> RankingSums:
    """RankingSums at k of the lists `top_ids` (n × K' item indices in rank order,
    -1 = padding; the first k columns are used, missing columns count as padding)
    against the relevant items of each row u, relevant_indices[relevant_indptr[u]:
    relevant_indptr[u + 1]] (CSR, any order, duplicates allowed)."""
    k = int(k)
    if k < 1:
        raise ValueError(f'k must be >= 1, got {k}')
    top = np.asarray(top_ids, dtype=np.int64)
    if top.ndim != 2:
        raise ValueError(f'top_ids must be 2-d, got shape {top.shape}')
    n = top.shape[0]
    if top.shape[1] >= k:
        top = top[:, :k]
    else:
        top = np.concatenate([top, np.full((n, k - top.shape[1]), -1, np.int64)], axis=1)
    indptr, indices = check_csr(relevant_indptr, relevant_indices, n, 'relevant')
    if n == 0:
        return RankingSums(k=k)
    rel_items = indices[indptr[0]:indptr[-1]]
    rel_rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))

    # (row, item) pairs as one int64 key: a set per row by sorted_unique, membership
    # by binary search.
    width = int(max(rel_items.max(initial=-1), top.max(initial=-1))) + 1
    rel_keys = sorted_unique(rel_rows * width + rel_items)
    n_rel = np.bincount(rel_keys // width, minlength=n)
    valid = top >= 0
    top_keys = np.where(valid, np.arange(n, dtype=np.int64)[:, None] * width + top, -1)
    pos = np.minimum(np.searchsorted(rel_keys, top_keys), max(len(rel_keys) - 1, 0))
    hit = valid & (rel_keys[pos] == top_keys) if len(rel_keys) else np.zeros_like(valid)

    evaluated = n_rel > 0
    hit = hit[evaluated]
    n_rel = n_rel[evaluated]
    denom = np.minimum(n_rel, k)
    ranks = np.arange(1, k + 1, dtype=np.float64)
    hits_u = hit.sum(axis=1)
    hits_so_far = np.cumsum(hit, axis=1)
    ap = (hit * hits_so_far / ranks).sum(axis=1) / denom
    gain = 1.0 / np.log2(ranks + 1.0)
    ndcg = (hit * gain).sum(axis=1) / np.cumsum(gain)[denom - 1]
    return RankingSums(
        k=k, users=int(evaluated.sum()), hits=int(hits_u.sum()),
        precision_denominator=int(denom.sum()), ap_sum=fixed_sum(ap),
        ndcg_sum=fixed_sum(ndcg), recall_sum=fixed_sum(hits_u / n_rel))


def rank_and_score(queries: np.ndarray, items: np.ndarray, k: int,
                   relevant_rows: np.ndarray, relevant_cols: np.ndarray,
                   exclude_indptr: np.ndarray, exclude_indices: np.ndarray,
                   item_offsets: np.ndarray | None = None) -> RankingSums:
    """The ranking evaluation of a set of users (the trainer's per block, the
    comparison with the previous model, the tuner's and the benchmark's): rank these
    users' unseen items with top_k and score the hits against their relevant items.

    queries: the users' factors (n × d, bias column removed); items (n_items × d) and
    item_offsets (n_items, e.g. item biases; -inf removes an item) as for top_k.
    relevant_rows / relevant_cols: the relevant (user, item) pairs, user = row of
    `queries` (any order, duplicates allowed). exclude_indptr / exclude_indices: CSR
    over the n users of the items never recommended to them (their training items).
    Only users with a relevant item are ranked (the others count for nothing), each
    by the same kernel as a recommendation, so a user's list does not depend on the
    others; the sums are fixed-order (RankingSums of ranking_sums)."""
    n = len(queries)
    rel_rows = np.asarray(relevant_rows, np.int64).reshape(-1)
    rel_cols = np.asarray(relevant_cols, np.int64).reshape(-1)
    if rel_rows.shape != rel_cols.shape:
        raise ValueError(f'{len(rel_rows)} relevant rows for {len(rel_cols)} items')
    if len(rel_rows) and (rel_rows.min() < 0 or rel_rows.max() >= n):
        raise ValueError(f'relevant_rows must be in [0, {n})')
    counts = np.bincount(rel_rows, minlength=n)
    who = np.flatnonzero(counts)
    if not len(who):
        return RankingSums(k=int(k))
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    by_row = rel_cols[np.argsort(rel_rows, kind='stable')]
    rel_ptr, rel_idx = select_rows(indptr, by_row, who)
    ex_ptr, ex_idx = select_rows(exclude_indptr, exclude_indices, who)
    ids, _ = top_k(np.asarray(queries)[who], items, k, exclude_indptr=ex_ptr,
                   exclude_indices=ex_idx, item_offsets=item_offsets)
    return ranking_sums(ids, rel_ptr, rel_idx, k)

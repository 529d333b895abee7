"""Quality metrics of any method's factors on the benchmark's split, with the
project's own code (used by bench/quality_workers.py; no Beam import).

The split is NAME.split.tsv (bench/prepare_data.py: wals_core.hashing.is_test on
the IDs' hashes, split_seed 0, 10 %, exactly the trainer's). Repeated (user, item)
pairs are merged by their mean rating, as the trainer does for ratings.

Ranking (`ranking`), as pipeline/training/evaluate.py does it: wals_core.topk.top_k over
every item not in the user's training pairs, then wals_core.ranking.ranking_sums at
K (implicit.evaluation's conventions). Relevant items: the user's warm test items
(user and item both have a training rating, the pipeline's cold-start rule) with
rating >= threshold. An item without a training rating stays a candidate, with the
factors the method gave it (zero for Spark, which has none for it; zero in the
project's modes too, whose solve of an item without ratings gives 0).

RMSE (`rmse`): over the same warm test pairs, unclipped, and clipped to the
training ratings' [min, max] (the pipeline clips its explicit mode's predictions so).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from prepare_data import read_split


@dataclasses.dataclass(frozen=True)
class Split:
    """Training and test triples (dense 0-based indices) of one data set."""
    n_users: int
    n_items: int
    train_u: np.ndarray
    train_i: np.ndarray
    train_r: np.ndarray
    test_u: np.ndarray
    test_i: np.ndarray
    test_r: np.ndarray

    @classmethod
    def load(cls, name: str) -> 'Split':
        from wals_core.sparse import merge_duplicates
        u, i, r, test, nu, ni = read_split(name)
        u, i, r, test, _ = merge_duplicates(u, i, r, 'mean', test)
        tr = ~test
        return cls(nu, ni, u[tr], i[tr], r[tr], u[test], i[test], r[test])

    def user_has_train(self) -> np.ndarray:
        return np.bincount(self.train_u, minlength=self.n_users) > 0

    def item_has_train(self) -> np.ndarray:
        return np.bincount(self.train_i, minlength=self.n_items) > 0

    def warm_test(self) -> np.ndarray:
        """Mask of test pairs whose user and item both have a training rating."""
        return self.user_has_train()[self.test_u] & self.item_has_train()[self.test_i]


def _csr(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(rows, kind='stable')
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, np.asarray(cols, np.int64)[order]


def ranking(split: Split, user_factors: np.ndarray, item_factors: np.ndarray, k: int = 10,
            threshold: float = 0.0, item_offsets: np.ndarray | None = None) -> dict:
    """precision/recall/MAP/NDCG at k (wals_core.ranking's summary) of the scores
    user_factors · item_factors (+ item_offsets) on the split's warm test pairs."""
    from wals_core.ranking import ranking_sums
    from wals_core.topk import top_k
    offsets = None if item_offsets is None else np.asarray(item_offsets, np.float32)
    ex_indptr, ex_indices = _csr(split.train_u, split.train_i, split.n_users)
    ids, _ = top_k(np.asarray(user_factors, np.float32), np.asarray(item_factors, np.float32),
                   k, exclude_indptr=ex_indptr, exclude_indices=ex_indices,
                   item_offsets=offsets)
    rel = split.warm_test() & (split.test_r >= threshold)
    rel_indptr, rel_indices = _csr(split.test_u[rel], split.test_i[rel], split.n_users)
    out = ranking_sums(ids, rel_indptr, rel_indices, k).summary(k)
    out.update(rank_k=k, relevance_threshold=threshold)
    return out


def rmse(split: Split, predict) -> dict:
    """Test RMSE over the warm test pairs of predict(users, items) -> float64 ratings."""
    warm = split.warm_test()
    pred = np.asarray(predict(split.test_u[warm], split.test_i[warm]), np.float64)
    err = split.test_r[warm] - pred
    lo, hi = float(split.train_r.min()), float(split.train_r.max())
    err_c = split.test_r[warm] - np.clip(pred, lo, hi)
    n = int(warm.sum())
    return {'test_rmse': math.sqrt(err @ err / n) if n else None,
            'test_rmse_clipped': math.sqrt(err_c @ err_c / n) if n else None,
            'clip_range': [lo, hi], 'test_ratings': n}


def dot_predictor(user_factors: np.ndarray, item_factors: np.ndarray, global_mean: float = 0.0,
                  user_bias: np.ndarray | None = None, item_bias: np.ndarray | None = None):
    """predict(users, items) = μ + b_u + c_i + u·v (biases optional), in float64."""
    uf = np.asarray(user_factors, np.float64)
    vf = np.asarray(item_factors, np.float64)

    def predict(users, items):
        p = np.einsum('ij,ij->i', uf[users], vf[items]) + global_mean
        if user_bias is not None:
            p += np.asarray(user_bias, np.float64)[users]
        if item_bias is not None:
            p += np.asarray(item_bias, np.float64)[items]
        return p
    return predict

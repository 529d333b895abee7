"""pipeline.serving.recommender on models trained by the real pipeline (wals and explicit on
MovieLens 100k, implicit on synthetic string IDs): recommendations and similar items
against brute-force numpy, ID lookups, and fold-in against a dense np.linalg.solve
of the same row written out from each mode's objective."""
from __future__ import annotations

import logging
import pathlib
import shutil

import numpy as np
import pytest

from pipeline.store.model_files import ModelFiles
from pipeline.store.publish import UntrustedModel
from pipeline.serving.recommender import Recommender
from tests.conftest import write_ratings
from tests.pipeline_support import run_pipeline
from wals_core.hashing import id_hashes, is_test
from wals_core.params import WalsParams
from wals_core.train import Problem, solve_side
from wals_core.vocab import lookup

K = 10
ARGS = {
    'wals': ['--num_iters', '3', '--latent_factors', '6'],
    'explicit': ['--model', 'explicit', '--num_iters', '3', '--latent_factors', '6'],
    'implicit': ['--model', 'implicit', '--num_iters', '3', '--latent_factors', '8',
                 '--alpha', '2.0', '--epsilon', '0.5'],
}


def _string_id_ratings(path: pathlib.Path) -> pathlib.Path:
    """~4000 ratings of 200 users 'u<n>' on 150 items 'i<n>' (str vocabularies), with
    a few repeated pairs (the trainer merges them by their mean)."""
    rng = np.random.default_rng(11)
    pairs = rng.choice(200 * 150, size=4000, replace=False)
    pairs = np.concatenate([pairs, pairs[:50]])
    users, items = pairs // 150, pairs % 150
    return write_ratings(path, [f'u{u}' for u in users], [f'i{i}' for i in items],
                         rng.integers(1, 6, size=len(pairs)))


@pytest.fixture(scope='module', params=['wals', 'explicit', 'implicit'])
def trained(request, tmp_path_factory):
    """(mode, model folder, ratings file) of a model trained by the pipeline."""
    mode = request.param
    base = tmp_path_factory.mktemp(mode)
    if mode == 'implicit':
        data = _string_id_ratings(base / 'ratings.tsv')
    else:
        data = request.getfixturevalue('ml100k')
    run_pipeline(data, base / 'out', *ARGS[mode])
    return mode, base / 'out', data


@pytest.fixture(scope='module')
def rec(trained):
    return Recommender.load(str(trained[1]))


def _ratings(data: pathlib.Path):
    """(user IDs, item IDs, ratings) of a ratings file, as the strings in it."""
    t = np.loadtxt(data, dtype=str, delimiter='\t', ndmin=2)
    return t[:, 0], t[:, 1], t[:, 2].astype(np.float64)


def _seen_from_file(rec: Recommender, data: pathlib.Path) -> list[set]:
    users, items, _ = _ratings(data)
    seen = [set() for _ in range(len(rec.users))]
    for u, i in zip(lookup(rec.users, users), lookup(rec.items, items)):
        seen[u].add(int(i))
    return seen


def _brute_force(scores: np.ndarray, excluded: set, k: int) -> np.ndarray:
    """Item rows by score descending, ties by row number, excluded rows left out."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return np.array([j for j in order if j not in excluded][:k], np.int64)


def _check_ranking(got, rec: Recommender, want_scores: np.ndarray, excluded: set, k: int):
    """got = [(item_id, score)] against float64 scores of every item: the same
    scores in rank order (float32 tolerance), none excluded, no repeats, and the
    same items wherever the brute-force scores are not tied within 1e-5."""
    rows = np.array([rec.item_index(i) for i, _ in got], np.int64)
    scores = np.array([s for _, s in got])
    want = _brute_force(want_scores, excluded, k)
    assert len(rows) == len(want) == min(k, len(want_scores) - len(excluded))
    assert len(set(rows.tolist())) == len(rows)
    assert not set(rows.tolist()) & excluded
    assert np.all(np.diff(scores) <= 0)
    np.testing.assert_allclose(scores, want_scores[want], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(want_scores[rows], want_scores[want], rtol=1e-5, atol=1e-5)
    s = want_scores[want]
    gap_before = np.concatenate([[np.inf], -np.diff(s)])
    gap_after = np.concatenate([-np.diff(s), [np.inf]])
    clear = (gap_before > 1e-5) & (gap_after > 1e-5)
    np.testing.assert_array_equal(rows[clear], want[clear])


def _scores64(rec: Recommender, stored_row: np.ndarray) -> np.ndarray:
    """Every item's score for a stored user row, in float64 (explicit: the rating)."""
    k = rec.params.latent_factors
    s = rec.col.astype(np.float64) @ np.asarray(stored_row[:k], np.float64)
    if rec.explicit:
        s += rec.global_mean + float(stored_row[k]) + rec.col_bias
    return s


def _stored(rec: Recommender, i: int) -> np.ndarray:
    if rec.explicit:
        return np.append(rec.row[i], rec.row_bias[i])
    return rec.row[i]


def test_recommend_matches_brute_force(rec, trained):
    seen = _seen_from_file(rec, trained[2])
    rng = np.random.default_rng(0)
    for i in rng.choice(len(rec.users), size=25, replace=False):
        uid = rec.user_id(i)
        want = _scores64(rec, _stored(rec, i))
        _check_ranking(rec.recommend(uid, K), rec, want, seen[i], K)
        _check_ranking(rec.recommend(uid, K, exclude_seen=False), rec, want, set(), K)
        # the model's record of seen items is every pair of the input
        assert set(rec.seen(uid).tolist()) == seen[i]


def test_explicit_scores_are_predicted_ratings(rec):
    if not rec.explicit:
        pytest.skip('explicit models only')
    from wals_core import objectives
    i = 5
    got = rec.recommend(rec.user_id(i), K, exclude_seen=False)
    cols = np.array([rec.item_index(j) for j, _ in got])
    u = np.concatenate([rec.row, rec.row_bias[:, None]], axis=1)
    pred = objectives.predict(np.full(len(cols), i), cols, u, rec.col_stored, rec.params,
                              rec.global_mean)
    np.testing.assert_allclose([s for _, s in got], pred, rtol=1e-5)


def test_similar_items_match_brute_force_cosine(rec):
    v = rec.col.astype(np.float64)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    unit = np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)   # zero stays zero
    for j in np.random.default_rng(1).choice(len(rec.items), size=20, replace=False):
        _check_ranking(rec.similar_items(rec.item_id(j), K), rec, unit @ unit[j], {int(j)}, K)


def test_id_lookups_both_ways(rec):
    for i in (0, 7, len(rec.users) - 1):
        uid = rec.user_id(i)
        assert type(uid) in (int, str)
        assert rec.user_index(uid) == i
        assert rec.user_index(str(uid)) == i
        if isinstance(uid, int):
            assert rec.user_index(np.int64(uid)) == i
    for j in (0, 3, len(rec.items) - 1):
        assert rec.item_index(rec.item_id(j)) == j
        assert rec.item_index(str(rec.item_id(j))) == j
    assert rec.recommend(str(rec.user_id(3)), 4) == rec.recommend(rec.user_id(3), 4)
    with pytest.raises(IndexError):
        rec.user_id(len(rec.users))


def test_unknown_ids_raise_key_error(rec):
    for bad in (99999999, 'nope', '', -1):
        with pytest.raises(KeyError, match='not in the model'):
            rec.user_index(bad)
        with pytest.raises(KeyError, match='not in the model'):
            rec.item_index(bad)
    with pytest.raises(KeyError):
        rec.recommend('nope')
    with pytest.raises(KeyError):
        rec.similar_items('nope')
    if rec.users.dtype.kind == 'i':
        uid = rec.user_id(0)
        for text in (f'0{uid}', f'+{uid}', f' {uid}'):   # not the ID's canonical text
            with pytest.raises(KeyError):
                rec.user_index(text)


# ---- fold-in -------------------------------------------------------------------


def _dense_fold_in(rec: Recommender, cols: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The row minimizing the mode's loss with the item factors fixed, from a dense
    system over every item (written from the objectives, not the solver)."""
    p: WalsParams = rec.params
    v = rec.col.astype(np.float64)
    n_items, k = v.shape
    obs = np.zeros(n_items, bool)
    obs[cols] = True
    r = np.zeros(n_items)
    r[cols] = values
    if p.model == 'wals':
        n = rec.files.col_counts.astype(np.float64)
        c = np.zeros(n_items)
        if p.wt_type == 'linear':
            c[n > 0] = p.feature_wt_factor / n[n > 0]
        else:
            c[n > 0] = (1.0 / n[n > 0]) ** p.feature_wt_exp
        w = np.full(n_items, p.unobs_weight)
        w[obs] += c[obs]                       # R_i = 1 with weights on
        a = (v * w[:, None]).T @ v + p.regularization * np.eye(k)
        return np.linalg.solve(a, v.T @ (w * r))
    if p.model == 'implicit':
        g = np.log1p(r / p.epsilon) if p.confidence == 'log' else r
        conf = np.where(obs, 1.0 + p.alpha * g, 1.0)
        pref = (obs & (r > 0)).astype(np.float64)
        lam = p.regularization * (obs.sum() if p.scale_regularization else 1)   # λ·n_u
        a = (v * conf[:, None]).T @ v + lam * np.eye(k)
        return np.linalg.solve(a, v.T @ (conf * pref))
    x = np.concatenate([v[cols], np.ones((len(cols), 1))], axis=1)   # [v_j, 1]
    t = values - rec.global_mean - rec.col_bias[cols].astype(np.float64)
    a = x.T @ x + p.regularization * len(cols) * np.eye(k + 1)
    return np.linalg.solve(a, x.T @ t)


def _some_ratings(rec: Recommender, seed: int, n: int):
    rng = np.random.default_rng(seed)
    cols = rng.choice(len(rec.items), size=n, replace=False)
    values = rng.integers(1, 6, size=n).astype(np.float64)
    return cols, values


@pytest.mark.parametrize('n', [1, 4, 30])
def test_fold_in_matches_dense_solve(rec, n):
    cols, values = _some_ratings(rec, n, n)
    got = rec.fold_in([(rec.item_id(j), r) for j, r in zip(cols, values)])
    want = _dense_fold_in(rec, cols, values)
    assert got.dtype == np.float32
    assert got.shape == (rec.params.latent_factors + rec.explicit,)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_fold_in_merges_repeated_items_by_mean(rec):
    a, b = rec.item_id(2), rec.item_id(9)
    merged = rec.fold_in([(a, 5.0), (b, 2.0), (a, 3.0)])
    np.testing.assert_array_equal(merged, rec.fold_in([(b, 2.0), (a, 4.0)]))
    assert not np.array_equal(merged, rec.fold_in([(a, 5.0), (b, 2.0)]))
    want = _dense_fold_in(rec, np.array([2, 9]), np.array([4.0, 2.0]))
    np.testing.assert_allclose(merged, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_fold_in_of_training_users_is_the_trainers_row_solve(rec, trained):
    """A user's own training ratings, folded in, give the trainer's row half-step
    against the final item factors (wals_core.train.solve_side on every row)."""
    users, items, values = _ratings(trained[2])
    r, c = lookup(rec.users, users), lookup(rec.items, items)
    desc = rec.files.manifest['parameters']
    test = is_test(id_hashes(rec.users.tolist())[r], id_hashes(rec.items.tolist())[c],
                   desc['split_seed'], desc['test_fraction'])
    from wals_core.sparse import merge_duplicates
    tr, tc, ta, _, _ = merge_duplicates(r[~test], c[~test], values[~test], 'mean')
    problem = Problem.build(tr, tc, ta, len(rec.users), len(rec.items), rec.params)
    # the model's col_counts and μ are the trainer's: the fold-in solves with them
    np.testing.assert_array_equal(problem.col_counts, rec.files.col_counts)
    if rec.explicit:
        assert problem.global_mean == pytest.approx(rec.global_mean, rel=1e-12)
    want = solve_side(problem, 'row', rec.col_stored, rec.params)
    final = np.stack([_stored(rec, i) for i in range(len(rec.users))])
    for i in np.random.default_rng(2).choice(len(rec.users), size=12, replace=False):
        mine = tr == i
        got = rec.fold_in([(rec.item_id(j), a) for j, a in zip(tc[mine], ta[mine])])
        np.testing.assert_allclose(got, want[i], rtol=1e-4, atol=1e-5 * np.abs(want[i]).max())
    # and the row the trainer published (solved against the previous item factors)
    # points the same way as a fresh solve against the final ones
    cos = np.einsum('ij,ij->i', want, final) / (
        np.linalg.norm(want, axis=1) * np.linalg.norm(final, axis=1) + 1e-30)
    assert np.median(cos) > 0.8


def test_recommend_new_user_excludes_rated_items(rec):
    cols, values = _some_ratings(rec, 5, 8)
    ratings = [(rec.item_id(j), r) for j, r in zip(cols, values)]
    row = _dense_fold_in(rec, cols, values)
    want = _scores64(rec, row)
    _check_ranking(rec.recommend_new_user(ratings, K), rec, want, set(cols.tolist()), K)
    _check_ranking(rec.recommend_new_user(ratings, K, exclude_rated=False), rec, want, set(), K)
    assert rec._rank(rec.fold_in(ratings), K, None) == \
        rec.recommend_new_user(ratings, K, exclude_rated=False)


def test_fold_in_unknown_items(rec, caplog):
    known = [(rec.item_id(1), 4.0), (rec.item_id(2), 3.0)]
    with pytest.raises(KeyError, match='1 rated item'):
        rec.fold_in(known + [('no-such-item', 5.0)])
    with caplog.at_level(logging.WARNING, logger='pipeline.serving.recommender'):
        skipped = rec.fold_in(known + [('no-such-item', 5.0)], on_unknown='skip')
    assert 'no-such-item' in caplog.text
    np.testing.assert_array_equal(skipped, rec.fold_in(known))
    with pytest.raises(ValueError):
        rec.fold_in([(rec.item_id(1), float('nan'))])
    # no ratings at all: the regularized minimizer, 0
    np.testing.assert_array_equal(rec.fold_in([]), np.zeros_like(skipped))


# ---- ties and refusals -----------------------------------------------------------


def _handmade(col: np.ndarray, row: np.ndarray, seen: list[list[int]]) -> Recommender:
    params = WalsParams(latent_factors=col.shape[1], model='implicit')
    files = ModelFiles('mem', {'parameters': {}}, params, np.arange(len(row)) * 10,
                       np.arange(len(col)) + 100, row.astype(np.float32),
                       col.astype(np.float32), np.ones(len(col), np.int64))
    indptr = np.cumsum([0] + [len(s) for s in seen])
    return Recommender(files, indptr, np.concatenate([np.array(s, np.int32) for s in seen]))


def test_ties_break_by_item_row_number():
    col = np.array([[1, 0], [2, 0], [1, 0], [2, 0], [0, 1], [2, 0]], np.float64)
    rec = _handmade(col, np.array([[1, 0], [1, 0]]), [[3], []])
    assert rec.recommend(0, 4) == [(101, 2.0), (105, 2.0), (100, 1.0), (102, 1.0)]
    assert rec.recommend(10, 3) == [(101, 2.0), (103, 2.0), (105, 2.0)]
    assert rec.recommend(0, 4, exclude_seen=False)[:3] == [(101, 2.0), (103, 2.0), (105, 2.0)]
    # fewer items than k: only the items left
    assert [i for i, _ in rec.recommend(0, 10)] == [101, 105, 100, 102, 104]
    assert [i for i, _ in rec.similar_items(100, 3)] == [101, 102, 103]


def test_tampered_model_is_refused(trained, tmp_path):
    for rel in ('model/col.npy', 'model/seen/part-00000.npz'):
        copy = tmp_path / rel.replace('/', '_')
        shutil.copytree(trained[1], copy)
        target = copy / rel
        data = bytearray(target.read_bytes())
        data[-1] ^= 1
        target.write_bytes(bytes(data))
        with pytest.raises(UntrustedModel):
            Recommender.load(str(copy))
    missing = tmp_path / 'no_manifest'
    shutil.copytree(trained[1], missing)
    (missing / '_SUCCESS').unlink()
    with pytest.raises(UntrustedModel):
        Recommender.load(str(missing))

"""The numpy core: weights, half-step solves, loss, init, split and vocabulary."""
from __future__ import annotations

import numpy as np
import pytest

from wals_core.hashing import id_hashes, is_test
from wals_core.init import initial_factors
from wals_core.params import WalsParams, parse_wt_type
from wals_core.solve import gramian, solve_rows
from wals_core.sparse import csr_from_triples, merge_duplicates, select_rows, sorted_unique
from wals_core.train import Problem, loss, solve_side, train
from wals_core.vocab import Vocabulary, finalize_ids
from wals_core.weights import column_weights, row_weights


def random_problem(seed=0, rows=25, cols=18, density=0.3):
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, cols)) < density
    r, c = np.nonzero(mask)
    values = rng.integers(1, 6, size=len(r)).astype(float)
    return r, c, values, rows, cols


def dense_row_solve(r, c, values, rows, cols, v, params):
    """Independent reference: per row, the dense weighted ridge problem over ALL columns."""
    counts = np.bincount(c, minlength=cols)
    cw = column_weights(counts, params)
    rw = row_weights(rows, params)
    a = np.zeros((rows, cols))
    obs = np.zeros((rows, cols), bool)
    a[r, c] = values
    obs[r, c] = True
    v = v.astype(np.float64)
    out = np.zeros((rows, v.shape[1]))
    for i in range(rows):
        w = np.where(obs[i], params.unobs_weight + rw[i] * cw, params.unobs_weight)
        lhs = v.T @ (w[:, None] * v) + params.regularization * np.eye(v.shape[1])
        out[i] = np.linalg.solve(lhs, v.T @ (w * a[i]))
    return out


@pytest.mark.parametrize('params', [
    WalsParams(latent_factors=3, wt_type='linear'),
    WalsParams(latent_factors=4, wt_type='log', feature_wt_exp=0.5),
    WalsParams(latent_factors=2, weights=False, unobs_weight=0.5),
])
def test_half_step_equals_dense_weighted_solve(params):
    r, c, values, rows, cols = random_problem()
    problem = Problem.build(r, c, values, rows, cols, params)
    v = initial_factors(id_hashes(range(cols)), params.latent_factors, 1, 'col')
    got = solve_rows(problem.by_row, problem.row_wts, v, problem.col_wts, gramian(v),
                     params.unobs_weight, params.regularization)
    want = dense_row_solve(r, c, values, rows, cols, v, params)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_column_half_step_is_the_transposed_problem():
    params = WalsParams(latent_factors=3)
    r, c, values, rows, cols = random_problem(seed=3)
    problem = Problem.build(r, c, values, rows, cols, params)
    u = initial_factors(id_hashes(range(rows)), 3, 2, 'row')
    got = solve_side(problem, 'col', u, params)
    # Column j's weights are C_j on its observed rows: the transposed dense problem.
    counts = np.bincount(c, minlength=cols)
    cw = column_weights(counts, params)
    a = np.zeros((rows, cols)); a[r, c] = values
    obs = np.zeros((rows, cols), bool); obs[r, c] = True
    u64 = u.astype(np.float64)
    for j in range(cols):
        w = np.where(obs[:, j], params.unobs_weight + cw[j], params.unobs_weight)
        lhs = u64.T @ (w[:, None] * u64) + params.regularization * np.eye(3)
        np.testing.assert_allclose(got[j], np.linalg.solve(lhs, u64.T @ (w * a[:, j])),
                                   rtol=2e-6, atol=1e-6)   # float32 storage


@pytest.mark.parametrize('wt_type', ['linear', 'log'])
def test_loss_never_increases_across_half_steps(wt_type):
    params = WalsParams(latent_factors=4, num_iters=6, wt_type=wt_type)
    r, c, values, rows, cols = random_problem(seed=5, rows=40, cols=30)
    problem = Problem.build(r, c, values, rows, cols, params)
    u0 = initial_factors(id_hashes(range(rows)), 4, 0, 'row')
    v0 = initial_factors(id_hashes(range(cols)), 4, 0, 'col')
    losses = [loss(problem, params, u0, v0)]
    train(problem, params, u0, v0,
          on_half_step=lambda it, side, u, v: losses.append(loss(problem, params, u, v)))
    assert len(losses) == 1 + 2 * params.num_iters
    steps = np.diff(losses)
    assert np.all(steps <= 1e-6 * np.abs(losses[:-1])), losses
    assert losses[-1] < 0.5 * losses[0]


def test_weights_follow_the_formulas():
    counts = np.array([0, 1, 4, 10])
    lin = column_weights(counts, WalsParams(feature_wt_factor=130.0))
    np.testing.assert_allclose(lin, [0.0, 130.0, 32.5, 13.0])
    log = column_weights(counts, WalsParams(wt_type='log', feature_wt_exp=0.08))
    np.testing.assert_allclose(log, [0.0, 1.0, 0.25 ** 0.08, 0.1 ** 0.08])
    off = WalsParams(weights=False)
    assert not column_weights(counts, off).any() and not row_weights(3, off).any()
    np.testing.assert_array_equal(row_weights(3, WalsParams()), [1.0, 1.0, 1.0])


def test_wt_type_codes_follow_the_original_constants():
    assert parse_wt_type(0) == 'log' and parse_wt_type('1') == 'linear'
    assert parse_wt_type('LOG') == 'log'
    with pytest.raises(ValueError):
        parse_wt_type('2')


def test_row_without_ratings_gets_zero_and_singular_rows_stay_finite():
    # Row 0: no ratings; row 1: one rating with k = 4 -> singular without λ and w0.
    block = csr_from_triples(np.array([1]), np.array([2]), np.array([4.0]), 2)
    v = initial_factors(id_hashes(range(5)), 4, 0, 'col')
    x = solve_rows(block, np.ones(2), v, np.ones(5), gramian(v), 0.0, 0.0)
    assert np.all(np.isfinite(x))
    np.testing.assert_array_equal(x[0], 0.0)
    # Least-squares answer: weight w0 + R·C = 1 on the one rating, so u·v2 = 4.
    assert x[1] @ v[2].astype(np.float64) == pytest.approx(4.0, rel=1e-6)
    params_ok = WalsParams(latent_factors=4)
    y = solve_rows(block, np.ones(2), v, np.ones(5), gramian(v), params_ok.unobs_weight,
                   params_ok.regularization)
    np.testing.assert_array_equal(y[0], 0.0)


def test_initial_factors_are_per_id_and_standard_normal():
    ids = np.arange(5000)
    h = id_hashes(ids)
    f = initial_factors(h, 8, seed=3, side='col')
    assert f.dtype == np.float32 and f.shape == (5000, 8)
    perm = np.random.default_rng(0).permutation(5000)
    np.testing.assert_array_equal(initial_factors(h[perm], 8, 3, 'col'), f[perm])
    assert abs(f.mean()) < 0.03 and abs(f.std() - 1.0) < 0.03
    assert not np.array_equal(initial_factors(h, 8, 4, 'col'), f)
    assert not np.array_equal(initial_factors(h, 8, 3, 'row'), f)


def test_split_is_stable_and_near_the_fraction():
    users = id_hashes([f'u{i}' for i in range(400)])
    items = id_hashes([f'i{i}' for i in range(300)])
    uu, ii = np.meshgrid(np.arange(400), np.arange(300), indexing='ij')
    test = is_test(users[uu.ravel()], items[ii.ravel()], 0, 0.1)
    assert 0.095 < test.mean() < 0.105
    again = is_test(users[uu.ravel()], items[ii.ravel()], 0, 0.1)
    np.testing.assert_array_equal(test, again)
    other = is_test(users[uu.ravel()], items[ii.ravel()], 1, 0.1)
    assert (test != other).mean() > 0.1
    assert not is_test(users[uu.ravel()], items[ii.ravel()], 0, 0.0).any()
    # Known value: the hash is a fixed function of the ID text (no salted hash()).
    assert int(id_hashes(['42'])[0]) == int.from_bytes(
        __import__('hashlib').blake2b(b'42', digest_size=8).digest(), 'little')


def test_vocabulary_sorts_integers_numerically_and_keeps_strings():
    ints = finalize_ids(np.array(['10', '9', '100', '-3']))
    assert ints.dtype == np.int64 and ints.tolist() == [-3, 9, 10, 100]
    mixed = finalize_ids(np.array(['10', '9', 'abc']))
    assert mixed.dtype.kind == 'U' and mixed.tolist() == ['10', '9', 'abc']
    padded = finalize_ids(np.array(['007', '8']))   # "007" is not canonical: keep the text
    assert padded.dtype.kind == 'U'
    vocab = Vocabulary(ints)
    np.testing.assert_array_equal(vocab.lookup(np.array(['100', '-3'])), [3, 0])
    with pytest.raises(KeyError):
        vocab.lookup(np.array(['11']))


def test_merge_duplicates_mean_or_sum_in_any_order():
    rows = np.array([1, 0, 1, 1, 0])
    cols = np.array([2, 1, 2, 3, 1])
    vals = np.array([0.1, 4.0, 0.7, 5.0, 2.0])
    r, c, v, _, merged = merge_duplicates(rows, cols, vals, 'mean')
    assert merged == 2
    assert r.tolist() == [0, 1, 1] and c.tolist() == [1, 2, 3]
    np.testing.assert_allclose(v, [3.0, 0.4, 5.0])
    perm = [4, 2, 0, 3, 1]
    r2, c2, v2, _, _ = merge_duplicates(rows[perm], cols[perm], vals[perm], 'mean')
    assert v2.tobytes() == v.tobytes()
    _, _, s, _, _ = merge_duplicates(rows, cols, vals, 'sum')
    np.testing.assert_allclose(s, [6.0, 0.8, 5.0])


def test_squared_error_sums_every_slice(monkeypatch):
    import wals_core.metrics as metrics
    rng = np.random.default_rng(4)
    u = rng.standard_normal((30, 4)).astype(np.float32)
    v = rng.standard_normal((20, 4)).astype(np.float32)
    rows, cols = rng.integers(0, 30, 1000), rng.integers(0, 20, 1000)
    values = rng.uniform(1, 5, 1000)
    pred = (u.astype(np.float64) @ v.astype(np.float64).T)[rows, cols]
    want = float(np.sum((values - pred) ** 2))
    monkeypatch.setattr(metrics, '_SLICE', 64)          # 16 slices, the last one short
    assert metrics.squared_error(rows, cols, values, u, v) == pytest.approx(want, rel=1e-12)
    assert metrics.squared_error(rows[:0], cols[:0], values[:0], u, v) == 0.0
    assert metrics.rmse(want, 1000) == pytest.approx(np.sqrt(want / 1000))
    assert metrics.rmse(0.0, 0) is None


@pytest.mark.parametrize('dtype', [np.int64, np.int32, np.float64])
@pytest.mark.parametrize('size', [0, 1, 2, 7, 5000])
def test_sorted_unique_is_np_unique(dtype, size):
    rng = np.random.default_rng(size)
    keys = rng.integers(-50, 50 if size < 100 else 2000, size).astype(dtype)
    want = np.unique(keys)
    got = sorted_unique(keys.copy())
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('seed', range(6))
def test_select_rows_gives_each_rows_entries_in_the_given_order(seed):
    """Increasing rows take the mask path, any other order the index path: both are
    each selected row's entries, in the order of `rows`, on a CSR whose pointers need
    not start at 0 and with empty rows."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 4, 40) * (rng.random(40) < 0.7)
    indptr = 5 + np.concatenate([[0], np.cumsum(lengths)])
    indices = rng.integers(0, 1000, indptr[-1] + 3).astype(np.int32)
    for rows in (np.flatnonzero(rng.random(40) < 0.6), rng.permutation(40)[:25],
                 np.array([7]), np.array([], np.int64), np.array([3, 3, 9])):
        ptr, idx = select_rows(indptr, indices, rows)
        want = [indices[indptr[r]:indptr[r + 1]] for r in rows]
        assert ptr[0] == 0 and np.array_equal(np.diff(ptr), [len(w) for w in want])
        assert idx.dtype == indices.dtype
        np.testing.assert_array_equal(idx, np.concatenate(want) if len(rows) else [])

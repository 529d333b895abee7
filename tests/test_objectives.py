"""The three objectives (--model wals|implicit|explicit) on the one blocked solver,
against dense per-row references written independently of wals_core.solve."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from wals_core import metrics, objectives, solve, weights
from wals_core.hashing import id_hashes
from wals_core.init import initial_factors
from wals_core.params import WalsParams
from wals_core.solve import RowSolver, gramian
from wals_core.sparse import Csr, csr_from_triples
from wals_core.sums import CHUNK, sum_of_squares
from wals_core.train import Problem, initial_state, solve_side, train


def random_ratings(seed=0, rows=30, cols=22, density=0.3, counts=False):
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, cols)) < density
    mask[rows - 1] = False                     # a user without ratings
    r, c = np.nonzero(mask)
    if counts:   # play counts: heavy tailed, some zeros
        values = np.floor(rng.pareto(1.0, size=len(r)) * 5).astype(float)
    else:
        values = rng.integers(1, 6, size=len(r)).astype(float)
    return r, c, values, rows, cols


def dense(r, c, values, rows, cols):
    a = np.zeros((rows, cols))
    obs = np.zeros((rows, cols), bool)
    a[r, c] = values
    obs[r, c] = True
    return a, obs


def implicit_reference(r, c, values, rows, cols, v, p, counts=None):
    """Hu-Koren-Volinsky per row: (Σ_j c_ij v_j v_jᵀ + λI) u = Σ_j c_ij p_ij v_j over
    ALL columns, c = 1 + alpha g(|r|) where observed, else 1; p = 1 where r > 0."""
    a, obs = dense(r, c, values, rows, cols)
    g = np.log1p(np.abs(a) / p.epsilon) if p.confidence == 'log' else np.abs(a)
    conf = np.where(obs, 1.0 + p.alpha * g, 1.0)
    pref = np.where(obs & (a > 0), 1.0, 0.0)
    v = v.astype(np.float64)
    out = np.zeros((rows, v.shape[1]))
    for i in range(rows):
        lam = p.regularization * (obs[i].sum() if p.scale_regularization else 1)
        if p.scale_regularization and not obs[i].any():
            continue        # no ratings and no regularization: the solver's 0
        lhs = v.T @ (conf[i][:, None] * v) + lam * np.eye(v.shape[1])
        out[i] = np.linalg.solve(lhs, v.T @ (conf[i] * pref[i]))
    return out


def explicit_reference(r, c, values, rows, cols, v_stored, p, mu):
    """Biased ALS-WR per row: minimize Σ_obs (r - μ - c_j - [v_j, 1]·x)² + λ n_i |x|²
    with x = [u_i, b_i]; a row without ratings gets 0."""
    a, obs = dense(r, c, values, rows, cols)
    k = p.latent_factors
    v = v_stored[:, :k].astype(np.float64)
    bias = v_stored[:, k].astype(np.float64)
    aug = np.hstack([v, np.ones((cols, 1))])
    out = np.zeros((rows, k + 1))
    for i in range(rows):
        j = np.flatnonzero(obs[i])
        if not len(j):
            continue
        lhs = aug[j].T @ aug[j] + p.regularization * len(j) * np.eye(k + 1)
        out[i] = np.linalg.solve(lhs, aug[j].T @ (a[i, j] - mu - bias[j]))
    return out


@pytest.mark.parametrize('conf, scaled', [('log', False), ('linear', False), ('log', True)])
def test_implicit_half_step_equals_dense_reference(conf, scaled):
    p = WalsParams(model='implicit', latent_factors=4, regularization=0.3, alpha=2.5,
                   epsilon=0.5, confidence=conf, scale_regularization=scaled)
    r, c, values, rows, cols = random_ratings(seed=1, counts=True)
    values[::7] = 0.0          # zero counts: preference 0, confidence 1
    values[3::11] *= -1        # negative: preference 0, confidence from |r|
    problem = Problem.build(r, c, values, rows, cols, p)
    v = objectives.initial_matrix(initial_factors(id_hashes(range(cols)), 4, 3, 'col'), p)
    got = solve_side(problem, 'row', v, p)
    want = implicit_reference(r, c, values, rows, cols, v, p)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=2e-5, atol=1e-6)


def test_explicit_half_steps_equal_dense_reference():
    p = WalsParams(model='explicit', latent_factors=3, regularization=0.1)
    r, c, values, rows, cols = random_ratings(seed=2)
    problem = Problem.build(r, c, values, rows, cols, p)
    mu = values.mean()
    assert problem.global_mean == pytest.approx(mu)
    rng = np.random.default_rng(5)
    v = rng.normal(size=(cols, 4)).astype(np.float32)     # last column: item biases
    got_u = solve_side(problem, 'row', v, p)
    np.testing.assert_allclose(got_u, explicit_reference(r, c, values, rows, cols, v, p, mu),
                               rtol=1e-5, atol=1e-6)
    assert np.all(got_u[rows - 1] == 0)                    # no ratings: 0 and bias 0
    # The column side is the transposed problem with the user biases as offsets.
    got_v = solve_side(problem, 'col', got_u, p)
    want_v = explicit_reference(c, r, values, cols, rows, got_u, p, mu)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-6)


def test_explicit_predictions_use_biases_and_clip():
    p = WalsParams(model='explicit', latent_factors=2)
    u = np.array([[1.0, 2.0, 0.5]])
    v = np.array([[3.0, -1.0, 0.25], [10.0, 10.0, 0.0]])
    pred = objectives.predict(np.array([0, 0]), np.array([0, 1]), u, v, p, 3.0)
    np.testing.assert_allclose(pred, [1 * 3 - 2 + 3 + 0.5 + 0.25, 30 + 3.5])
    clipped = objectives.predict(np.array([0, 0]), np.array([0, 1]), u, v, p, 3.0, (1, 5))
    np.testing.assert_allclose(clipped, [4.75, 5.0])


@pytest.mark.parametrize('model', ['wals', 'implicit', 'explicit', 'implicit-scaled'])
def test_objective_never_increases(model):
    """Each half-step minimizes the mode's objective exactly over one side, so the
    objective is non-increasing (up to the float32 storage of the factors)."""
    scaled = model == 'implicit-scaled'
    model = model.split('-')[0]
    p = WalsParams(model=model, latent_factors=3, num_iters=6, regularization=0.2,
                   alpha=3.0, scale_regularization=scaled)
    r, c, values, rows, cols = random_ratings(seed=4, counts=model == 'implicit')
    problem = Problem.build(r, c, values, rows, cols, p)
    u0, v0 = initial_state(initial_factors(id_hashes(range(rows)), 3, 0, 'row'),
                           initial_factors(id_hashes(range(cols)), 3, 0, 'col'), p)
    history = []

    def record(it, side, u, v):
        history.append(objectives.objective(problem.by_row, problem.col_counts, u, v, p,
                                            problem.global_mean))
    train(problem, p, u0, v0, on_half_step=record)
    assert len(history) == 12
    steps = np.diff(history)
    assert np.all(steps <= 1e-5 * np.abs(history[:-1])), history
    assert history[-1] < history[0]


def test_wals_mode_is_the_original_solver():
    """The wals mode builds exactly the RowSolver the trainer always built."""
    p = WalsParams(latent_factors=3)
    r, c, values, rows, cols = random_ratings(seed=6)
    problem = Problem.build(r, c, values, rows, cols, p)
    v = initial_factors(id_hashes(range(cols)), 3, 1, 'col')
    direct = RowSolver(problem.by_row, problem.row_wts, problem.col_wts, p.unobs_weight,
                       p.regularization, 3).solve(v, gramian(v)).astype(np.float32)
    assert np.array_equal(solve_side(problem, 'row', v, p), direct)


# -- the solver's generalized inputs, directly ---------------------------------------

def general_reference(block: Csr, own, other, w0, lam, v, entry, row_reg, offsets):
    n, m = block.num_rows, len(other)
    k = v.shape[1]
    out = np.zeros((n, k))
    for i in range(n):
        lo, hi = block.indptr[i], block.indptr[i + 1]
        j = block.indices[lo:hi]
        w = np.full(m, w0)
        e = np.ones(hi - lo) if entry is None else entry[lo:hi]
        w[j] = w0 + own[i] * other[j] * e
        a = np.zeros(m)
        a[j] = block.values[lo:hi] - (0 if offsets is None else offsets[j])
        reg = lam if row_reg is None else row_reg[i]
        if hi == lo:
            continue
        lhs = v.T @ (w[:, None] * v) + reg * np.eye(k)
        out[i] = np.linalg.lstsq(lhs, v.T @ (w * a), rcond=None)[0]
    return out


@pytest.mark.parametrize('case', ['entry', 'entry_zero', 'row_reg', 'offsets', 'all',
                                  'general_all'])
def test_solver_generalizations_equal_dense(case):
    rng = np.random.default_rng(len(case))
    n, m, k = 40, 25, 4
    mask = rng.random((n, m)) < 0.35
    r, c = np.nonzero(mask)
    values = rng.normal(size=len(r)) + 3
    block = csr_from_triples(r, c, values, n)
    own = np.ones(n)
    other = rng.uniform(0.5, 2.0, size=m)
    if case == 'general_all':
        other[3] = 0.0          # some C_j <= 0: the general path
    entry = row_reg = offsets = None
    if case in ('entry', 'entry_zero', 'all', 'general_all'):
        entry = rng.uniform(0, 4, size=len(r))
        if case in ('entry_zero', 'general_all'):
            entry[::5] = 0.0    # weight w0 only, target still counts
    if case in ('row_reg', 'all', 'general_all'):
        row_reg = rng.uniform(0.01, 3, size=n)
    if case in ('offsets', 'all', 'general_all'):
        offsets = rng.normal(size=m)
    v = rng.normal(size=(m, k))
    w0, lam = 0.3, 0.2
    solver = RowSolver(block, own, other, w0, lam, k, entry_weights=entry,
                       row_regularization=row_reg, offsets=offsets is not None)
    for _ in range(2):     # the second solve reuses the plan
        got = solver.solve(v, gramian(v), other_offsets=offsets)
        want = general_reference(block, own, other, w0, lam, v, entry, row_reg, offsets)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-9)


def test_solver_rejects_bad_generalized_inputs():
    block = csr_from_triples(np.array([0, 1]), np.array([1, 0]), np.array([1.0, 2.0]), 2)
    with pytest.raises(ValueError, match='entry weights'):
        RowSolver(block, np.ones(2), np.ones(2), 0.1, 0.1, 2, entry_weights=np.ones(3))
    with pytest.raises(ValueError, match='>= 0'):
        RowSolver(block, np.ones(2), np.ones(2), 0.1, 0.1, 2,
                  entry_weights=np.array([1.0, -1.0]))
    solver = RowSolver(block, np.ones(2), np.ones(2), 0.1, 0.1, 2)
    with pytest.raises(ValueError, match='offsets=True'):
        solver.solve(np.ones((2, 2)), np.eye(2), other_offsets=np.zeros(2))


def test_implicit_mode_plans_the_fast_path_despite_padding():
    """Padded entries (E = 0, the row's last value repeated) must not send a batch to
    the general path, which redoes its weights in every solve (it did: the implicit
    mode ran ~1.5x slower than wals)."""
    p = WalsParams(model='implicit', latent_factors=3)
    r, c, values, rows, cols = random_ratings(seed=10)        # ratings 1..5: E > 0
    problem = Problem.build(r, c, values, rows, cols, p)
    solver = objectives.make_solver(problem.by_row, 'row', p, problem.col_counts, 0, cols)
    v = np.random.default_rng(0).normal(size=(cols, 3)).astype(np.float32)
    solver.solve(v, gramian(v))
    batches = [b for chunk in solver._plan if chunk for b in chunk]
    assert batches and any(len(set(np.diff(problem.by_row.indptr)[b.rows])) > 1
                           for b in batches)                 # some batch has padding
    assert all(b.general is None for b in batches)


def test_objective_terms_belong_to_one_block_and_parameters():
    p = WalsParams(model='implicit', latent_factors=3)
    r, c, values, rows, cols = random_ratings(seed=9, counts=True)
    problem = Problem.build(r, c, values, rows, cols, p)
    terms = objectives.ObjectiveTerms(problem.by_row, p, problem.col_counts)
    # A slice of entries: the rows and confidences the whole block would give there.
    by_row = problem.by_row
    every_row = by_row.row_of_entry()
    lo, hi = 3, by_row.nnz - 2
    got_rows, got_cols, got_values, weight = terms.entries(lo, hi)
    assert np.array_equal(got_rows, every_row[lo:hi])
    assert np.array_equal(got_cols, by_row.indices[lo:hi])
    whole = objectives.confidence(by_row.values, p)
    assert np.array_equal(weight, whole[lo:hi])
    # wals: its per-column table gives w0 + R_i C_j, the same bits as every entry's
    # own product.
    pw = WalsParams(model='wals', latent_factors=3, unobs_weight=0.3, feature_wt_factor=7.0)
    wals_terms = objectives.ObjectiveTerms(by_row, pw, problem.col_counts)
    whole = pw.unobs_weight + (weights.row_weights(rows, pw)[every_row]
                               * weights.column_weights(problem.col_counts, pw)[by_row.indices])
    assert np.array_equal(wals_terms.entries(lo, hi)[3], whole[lo:hi])
    u = np.ones((rows, 3), np.float32)
    v = np.ones((cols, 3), np.float32)
    with pytest.raises(ValueError, match='terms'):
        objectives.block_objective(problem.by_row, 0, u, v, dataclasses.replace(p, alpha=2.0),
                                   problem.col_counts, terms=terms)
    with pytest.raises(ValueError, match='terms'):
        objectives.block_objective(problem.by_col, 0, v, u, p, problem.col_counts, terms=terms)


def test_params_validate_the_mode():
    with pytest.raises(ValueError, match='model'):
        WalsParams(model='bpr')
    with pytest.raises(ValueError, match='confidence'):
        WalsParams(model='implicit', confidence='sqrt')
    assert dataclasses.replace(WalsParams(), model='explicit').model == 'explicit'


@pytest.mark.parametrize('model', ['wals', 'implicit', 'explicit', 'implicit-scaled'])
def test_block_objectives_sum_to_the_objective(model):
    """The pipeline's per-block objective (history, --tolerance) equals the in-memory
    objective, for any cut of the rows into blocks."""
    scaled = model == 'implicit-scaled'
    model = model.split('-')[0]
    p = WalsParams(model=model, latent_factors=3, regularization=0.3, alpha=2.0,
                   scale_regularization=scaled)
    r, c, values, rows, cols = random_ratings(seed=8, counts=model == 'implicit')
    problem = Problem.build(r, c, values, rows, cols, p)
    rng = np.random.default_rng(0)
    width = objectives.stored_width(p)
    u = rng.normal(size=(rows, width)).astype(np.float32)
    v = rng.normal(size=(cols, width)).astype(np.float32)
    mu = problem.global_mean
    want = objectives.objective(problem.by_row, problem.col_counts, u, v, p, mu)
    total = sse = 0.0
    for start in range(0, rows, 7):
        stop = min(rows, start + 7)
        mask = (r >= start) & (r < stop)
        block = csr_from_triples(r[mask] - start, c[mask], values[mask], stop - start)
        part, err = objectives.block_objective(block, start, u, v, p, problem.col_counts, mu)
        # The block's ObjectiveTerms, kept across iterations: the same numbers, bit for bit.
        terms = objectives.ObjectiveTerms(block, p, problem.col_counts)
        for factor in (1.0, 0.5):
            uu, vv = (u * np.float32(factor), v * np.float32(factor))
            assert objectives.block_objective(block, start, uu, vv, p, problem.col_counts, mu,
                                              terms=terms) == \
                objectives.block_objective(block, start, uu, vv, p, problem.col_counts, mu)
        total += part
        sse += err
    # the column regularization summed over column blocks, as the pipeline does
    norm = sum(objectives.count_norm(problem.col_counts[s:s + 5], v[s:s + 5])
               for s in range(0, len(v), 5))
    total += objectives.global_objective(gramian(u), gramian(v), p, norm)
    # float32 products of the stored factors, float64 sums: ~1e-9 relative here
    assert total == pytest.approx(want, rel=1e-7)
    pred = objectives.predict(r, c, u, v, p, mu)
    target = objectives.preference(values) if model == 'implicit' else values
    assert sse == pytest.approx(float(np.sum((target - pred) ** 2)), rel=1e-7)


@pytest.mark.parametrize('model', ['wals', 'implicit', 'explicit'])
def test_block_objective_is_the_same_on_any_number_of_threads(model, monkeypatch):
    """Slices run on the kernel's threads and are summed in slice order afterwards:
    1, 2 or 3 threads give the same bits (the block spans several slices)."""
    rng = np.random.default_rng(5)
    n_rows, n_cols, nnz = 2_000, 500, 3 * objectives._SLICE + 123
    keys = rng.choice(n_rows * n_cols, nnz, replace=False)
    block = csr_from_triples(keys // n_cols, keys % n_cols,
                             rng.integers(1, 6, nnz).astype(np.float64), n_rows)
    counts = np.bincount(keys % n_cols, minlength=n_cols)
    p = WalsParams(model=model, latent_factors=6)
    w = objectives.stored_width(p)
    u = rng.normal(size=(n_rows, w)).astype(np.float32)
    v = rng.normal(size=(n_cols, w)).astype(np.float32)
    got = {}
    for threads in (1, 2, 3):
        monkeypatch.setattr(solve, 'default_threads', lambda t=threads: t)
        got[threads] = objectives.block_objective(block, 0, u, v, p, counts, 3.0)
    assert got[1] == got[2] == got[3]
    assert np.isfinite(got[1][0]) and got[1][1] > 0


@pytest.mark.parametrize('threads', [1, 2, 3])
def test_squared_errors_are_the_unsliced_sums_bit_for_bit(threads, monkeypatch):
    """The evaluation's squared errors run slice by slice on the kernel's threads: for
    any slice size (a multiple of sums.CHUNK) and thread count they are the bits of
    one fixed-order sum over every entry's residual at once."""
    monkeypatch.setattr(solve, 'default_threads', lambda: threads)
    monkeypatch.setattr(metrics, '_SLICE', 2 * CHUNK)      # 4 slices, the last short
    rng = np.random.default_rng(8)
    n = 3 * 2 * CHUNK + 1001
    rows, cols = rng.integers(0, 700, n), rng.integers(0, 300, n)
    values = rng.integers(1, 6, n).astype(np.float32)
    p = WalsParams(model='explicit', latent_factors=7)
    u = rng.normal(size=(700, objectives.stored_width(p))).astype(np.float32)
    v = rng.normal(size=(300, objectives.stored_width(p))).astype(np.float32)
    u64, v64 = u[:, :7].astype(np.float64), v[:, :7].astype(np.float64)
    residual = values - np.einsum('ij,ij->i', u64[rows], v64[cols])
    assert metrics.squared_error(rows, cols, values, u[:, :7], v[:, :7]) \
        == sum_of_squares(residual)
    residual = values - objectives.predict(rows, cols, u, v, p, 3.2, (1.0, 5.0))
    assert objectives.predicted_squared_error(rows, cols, values, u, v, p, 3.2, (1.0, 5.0)) \
        == sum_of_squares(residual)
    assert objectives.predicted_squared_error(rows[:0], cols[:0], values[:0], u, v, p) == 0.0


def test_map_slices_runs_on_threads_and_keeps_slice_order(monkeypatch):
    monkeypatch.setattr(solve, 'default_threads', lambda: 3)
    barrier = threading.Barrier(3, timeout=30)     # only passes if 3 slices run at once
    idents = set()

    def one(lo: int) -> int:
        if lo < 30:
            barrier.wait()
        idents.add(threading.get_ident())
        return lo
    assert solve.map_slices(one, 95, 10) == list(range(0, 95, 10))
    assert len(idents) == 3
    assert solve.map_slices(one, 0, 10) == []


def test_rows_of_entries_skips_empty_rows_and_cuts_anywhere():
    indptr = np.array([0, 0, 3, 3, 3, 7, 8, 8], np.int64)     # rows 0, 2, 3, 6 empty
    every_row = np.repeat(np.arange(7), np.diff(indptr))
    for lo in range(9):
        for hi in range(lo, 9):
            assert np.array_equal(objectives.rows_of_entries(indptr, lo, hi),
                                  every_row[lo:hi]), (lo, hi)

"""The fast half-step kernel (wals_core.solve.solve_rows) against a plain dense
per-row reference: one np.linalg.solve (or, for singular systems, the minimum-norm
least-squares answer) per row, built entry by entry with no shared code."""
from __future__ import annotations

import numpy as np
import pytest

import wals_core.cg as cg_mod
import wals_core.solve as solve_mod
from wals_core.solve import batched_solve, gramian, solve_rows
from wals_core.sparse import csr_from_triples


# ----------------------------------------------------------------------------------
# Reference and random problems
# ----------------------------------------------------------------------------------

def reference(block, own, factors, other, w0, lam, singular_ok=False):
    """Row by row: A = w0 VᵀV + λI + Σ_j R_i C_j v_j v_jᵀ, b = Σ_j (w0 + R_i C_j) a_ij v_j."""
    v = np.asarray(factors, dtype=np.float64)
    k = v.shape[1]
    g = v.T @ v
    out = np.zeros((block.num_rows, k))
    for i in range(block.num_rows):
        lo, hi = block.indptr[i], block.indptr[i + 1]
        if lo == hi:
            continue
        a = w0 * g + lam * np.eye(k)
        b = np.zeros(k)
        for j, value in zip(block.indices[lo:hi], block.values[lo:hi]):
            conf = own[i] * other[j]
            a += conf * np.outer(v[j], v[j])
            b += (w0 + conf) * value * v[j]
        if singular_ok:
            out[i] = np.linalg.lstsq(a, b, rcond=1e-9)[0]
        else:
            out[i] = np.linalg.solve(a, b)
    return out


def make_block(rng, k, n_rows=None, m=None, lengths=None):
    """Random duplicate-free CSR block whose rows have 0, 1, k-1, k and many entries."""
    m = m or int(rng.integers(max(k + 2, 20), 300))
    if lengths is None:
        menu = [0, 1, max(k - 1, 0), k, 2, 7, int(rng.integers(20, 120)), min(m, 250)]
        n_rows = n_rows or int(rng.integers(len(menu), 60))
        lengths = np.concatenate([menu, rng.choice(menu, n_rows - len(menu))])
        rng.shuffle(lengths)
    lengths = np.minimum(np.asarray(lengths), m)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.concatenate([rng.choice(m, l, replace=False) for l in lengths]
                          + [np.zeros(0, np.int64)])
    values = rng.integers(1, 6, len(rows)).astype(np.float64) + rng.standard_normal(len(rows))
    block = csr_from_triples(rows, cols, values, len(lengths))
    factors = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
    return block, factors


def run(block, own, factors, other, w0, lam, **kw):
    return solve_rows(block, own, factors, other, gramian(factors), w0, lam, **kw)


def assert_close(got, want, rtol=1e-8):
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


@pytest.fixture
def small_pieces(monkeypatch):
    """Tiny chunk / batch / gather-piece sizes, so small problems cross every boundary
    (several chunks and batches, rows cut into several pieces)."""
    monkeypatch.setattr(solve_mod, '_CHUNK_ENTRIES', 97)
    monkeypatch.setattr(solve_mod, '_CHUNK_ELEMENTS', 7 * 144)
    monkeypatch.setattr(solve_mod, '_BATCH_ELEMENTS', 3 * 144)
    monkeypatch.setattr(solve_mod, '_PIECE_ELEMENTS', 40)
    monkeypatch.setattr(cg_mod, '_CG_ELEMENTS', 50)


# ----------------------------------------------------------------------------------
# Exact solver
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize('seed', range(12))
def test_random_problems_match_dense_reference(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 13))
    block, factors = make_block(rng, k)
    own = rng.uniform(0.5, 2.0, block.num_rows)
    other = rng.uniform(0.0, 5.0, len(factors))
    w0, lam = float(rng.choice([0.001, 0.01, 0.3])), float(rng.choice([0.05, 1.0, 9.8]))
    got = run(block, own, factors, other, w0, lam)
    assert got.dtype == np.float64 and got.shape == (block.num_rows, k)
    assert_close(got, reference(block, own, factors, other, w0, lam))


@pytest.mark.parametrize('seed', range(6))
def test_small_pieces_cross_chunk_batch_and_piece_boundaries(seed, small_pieces):
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(1, 13))
    block, factors = make_block(rng, k)
    own = np.ones(block.num_rows)
    other = rng.uniform(0.1, 3.0, len(factors))
    for threads in (1, 3):
        got = run(block, own, factors, other, 0.01, 0.1, num_threads=threads)
        assert_close(got, reference(block, own, factors, other, 0.01, 0.1))


def test_project_weights_linear_and_log_shapes():
    """R = 1 and C_j = f / n_j or (1/n_j)^e, as wals_core.weights makes them."""
    rng = np.random.default_rng(7)
    block, factors = make_block(rng, 6, n_rows=40)
    counts = rng.integers(1, 500, len(factors)).astype(float)
    own = np.ones(block.num_rows)
    for other in (130.0 / counts, (1.0 / counts) ** 0.08):
        got = run(block, own, factors, other, 0.01, 0.07)
        assert_close(got, reference(block, own, factors, other, 0.01, 0.07))


def test_zero_weights_use_only_w0_gramian_and_lambda():
    rng = np.random.default_rng(3)
    k = 5
    block, factors = make_block(rng, k)
    own, other = np.zeros(block.num_rows), np.zeros(len(factors))
    got = run(block, own, factors, other, 0.5, 0.2)
    want = reference(block, own, factors, other, 0.5, 0.2)
    assert_close(got, want)
    # ... and that really is (w0 G + λI)⁻¹ w0 Σ a_ij v_j.
    v = factors.astype(np.float64)
    i = int(np.argmax(np.diff(block.indptr)))
    lo, hi = block.indptr[i], block.indptr[i + 1]
    b = 0.5 * block.values[lo:hi] @ v[block.indices[lo:hi]]
    np.testing.assert_allclose(got[i], np.linalg.solve(0.5 * v.T @ v + 0.2 * np.eye(k), b),
                               rtol=1e-9)


def test_mixed_zero_weights_rows_and_columns():
    """Some rows with R_i = 0, some columns with C_j = 0, in the same block."""
    rng = np.random.default_rng(11)
    k = 7
    block, factors = make_block(rng, k, n_rows=50)
    own = np.where(rng.random(block.num_rows) < 0.3, 0.0, rng.uniform(0.5, 2, block.num_rows))
    other = np.where(rng.random(len(factors)) < 0.3, 0.0, rng.uniform(0.1, 4, len(factors)))
    got = run(block, own, factors, other, 0.05, 0.3)
    assert_close(got, reference(block, own, factors, other, 0.05, 0.3))


def test_negative_column_weights_are_still_exact():
    rng = np.random.default_rng(12)
    k = 4
    block, factors = make_block(rng, k, n_rows=30)
    own = np.ones(block.num_rows)
    other = rng.uniform(-0.02, 1.0, len(factors))
    assert np.any(other < 0)
    got = run(block, own, factors, other, 0.1, 2.0)
    assert_close(got, reference(block, own, factors, other, 0.1, 2.0))


def test_empty_rows_get_zero_and_empty_blocks_work():
    rng = np.random.default_rng(5)
    block, factors = make_block(rng, 3, lengths=[0, 4, 0, 0, 9, 0])
    own, other = np.ones(6), np.ones(len(factors))
    got = run(block, own, factors, other, 0.01, 0.1)
    np.testing.assert_array_equal(got[[0, 2, 3, 5]], 0.0)
    assert np.all(got[[1, 4]] != 0)
    empty, _ = make_block(rng, 3, lengths=[0, 0])
    np.testing.assert_array_equal(run(empty, np.ones(2), factors, other, 0.01, 0.1),
                                  np.zeros((2, 3)))
    none = csr_from_triples(np.zeros(0), np.zeros(0), np.zeros(0), 0)
    assert run(none, np.ones(0), factors, other, 0.01, 0.1).shape == (0, 3)


@pytest.mark.parametrize('seed', range(8))
def test_singular_systems_get_least_squares_answer(seed):
    """λ = w0 = 0: a row with fewer ratings than factors is singular; it must get
    the minimum-norm least-squares answer, never NaN, without spoiling its batch."""
    rng = np.random.default_rng(200 + seed)
    k = int(rng.integers(2, 13))
    block, factors = make_block(rng, k)
    own = np.ones(block.num_rows)
    other = rng.uniform(0.5, 3.0, len(factors))
    got = run(block, own, factors, other, 0.0, 0.0)
    assert np.all(np.isfinite(got))
    assert_close(got, reference(block, own, factors, other, 0.0, 0.0, singular_ok=True),
                 rtol=1e-6)
    # A row with one rating: u·v_j = a_ij exactly (the least-squares fit).
    lens = np.diff(block.indptr)
    for i in np.flatnonzero(lens == 1):
        j = block.indices[block.indptr[i]]
        assert got[i] @ factors[j].astype(np.float64) == pytest.approx(
            block.values[block.indptr[i]], rel=1e-6)


def test_singular_shared_matrix_weights_off():
    """Weights off and λ = w0 = 0: every matrix is 0, so every answer is 0."""
    rng = np.random.default_rng(9)
    block, factors = make_block(rng, 4)
    got = run(block, np.zeros(block.num_rows), factors, np.zeros(len(factors)), 0.0, 0.0)
    np.testing.assert_array_equal(got, 0.0)


def test_singular_gramian_but_regular_rows_use_the_exact_solve():
    """λ = w0 = 0 but rows with plenty of ratings: nonsingular, exact answer."""
    rng = np.random.default_rng(13)
    k = 6
    block, factors = make_block(rng, k, lengths=[40, 60, 100, 7, 6])
    own, other = np.ones(5), rng.uniform(0.5, 2, len(factors))
    got = run(block, own, factors, other, 0.0, 0.0)
    assert_close(got, reference(block, own, factors, other, 0.0, 0.0), rtol=1e-7)


def test_float64_factors_and_int64_indices_are_accepted():
    rng = np.random.default_rng(14)
    block, factors = make_block(rng, 5, n_rows=20)
    block64 = type(block)(block.indptr, block.indices.astype(np.int64), block.values)
    own, other = np.ones(20), rng.uniform(0.1, 2, len(factors))
    want = reference(block, own, factors, other, 0.01, 0.1)
    assert_close(run(block64, own, factors.astype(np.float64), other, 0.01, 0.1), want)


def test_results_do_not_depend_on_threads():
    rng = np.random.default_rng(15)
    block, factors = make_block(rng, 9, n_rows=200)
    own, other = np.ones(200), rng.uniform(0.1, 2, len(factors))
    one = run(block, own, factors, other, 0.01, 0.1, num_threads=1)
    for threads in (2, 4):
        np.testing.assert_array_equal(run(block, own, factors, other, 0.01, 0.1,
                                          num_threads=threads), one)


def test_larger_k_matches_reference():
    """k = 32, the size the speed target is about (LU path for safe batches)."""
    rng = np.random.default_rng(16)
    k = 32
    block, factors = make_block(rng, k, m=400, lengths=[0, 1, 31, 32, 33, 150, 400, 5] * 3)
    own, other = np.ones(block.num_rows), rng.uniform(0.05, 2, len(factors))
    got = run(block, own, factors, other, 0.01, 0.07)
    assert_close(got, reference(block, own, factors, other, 0.01, 0.07))
    sing = run(block, own, factors, other, 0.0, 0.0)
    assert_close(sing, reference(block, own, factors, other, 0.0, 0.0, singular_ok=True),
                 rtol=1e-6)


def test_reference_is_sensitive_to_what_it_checks():
    """Guard against vacuous comparisons: dropping the weights or the Gramian changes
    the answer far beyond the tolerances used above."""
    rng = np.random.default_rng(17)
    block, factors = make_block(rng, 5, n_rows=30)
    own, other = np.ones(30), rng.uniform(0.5, 2, len(factors))
    got = run(block, own, factors, other, 0.1, 0.1)
    for changed in (run(block, own, factors, other * 1.001, 0.1, 0.1),
                    run(block, own, factors, other, 0.1001, 0.1),
                    solve_rows(block, own, factors, other, 1.001 * gramian(factors), 0.1, 0.1)):
        assert np.max(np.abs(changed - got)) > 1e-6 * np.max(np.abs(got))


def test_batched_solve_pseudo_inverse_for_singular_matrices():
    rng = np.random.default_rng(18)
    v = rng.standard_normal((3, 5))
    lhs = np.stack([v.T @ v, np.eye(5) * 2.0, np.zeros((5, 5))])
    rhs = rng.standard_normal((3, 5))
    x = batched_solve(lhs, rhs)
    np.testing.assert_allclose(x[0], np.linalg.pinv(lhs[0], rcond=1e-10) @ rhs[0], atol=1e-9)
    np.testing.assert_allclose(x[1], rhs[1] / 2.0)
    np.testing.assert_array_equal(x[2], 0.0)


def test_blas_runs_single_threaded_inside_a_solve_and_is_restored_after():
    from threadpoolctl import threadpool_info, threadpool_limits
    if not [p for p in threadpool_info() if p['user_api'] == 'blas']:
        pytest.skip('no BLAS thread control found')
    rng = np.random.default_rng(19)
    block, factors = make_block(rng, 4, n_rows=30)
    other = np.ones(len(factors))
    blas_threads = lambda: [p['num_threads'] for p in threadpool_info()
                            if p['user_api'] == 'blas']
    with threadpool_limits(limits=2, user_api='blas'):
        before = blas_threads()
        with solve_mod.single_threaded_blas():
            seen = blas_threads()
        after = blas_threads()
        x = run(block, np.ones(30), factors, other, 0.01, 0.1)   # a whole solve, too
        after_solve = blas_threads()
    assert set(seen) == {1}
    assert after == before and after_solve == before
    assert_close(x, reference(block, np.ones(30), factors, other, 0.01, 0.1))


@pytest.mark.parametrize('k, w0, lam, gufunc', [
    (4, 0.01, 0.1, 'solve1'),       # well conditioned: the batched LU path
    (6, 0.0, 0.0, 'cholesky_lo'),   # singular rows: Cholesky, then the pseudo-inverse
    (12, 0.01, 1e-9, 'solve1'),     # nearly singular
])
def test_solver_without_numpys_private_gufuncs_matches_the_normal_path(
        monkeypatch, k, w0, lam, gufunc):
    """wals_core.solve uses numpy's private _umath_linalg gufuncs when it finds them
    and the public np.linalg otherwise: both must give the same factors."""
    rng = np.random.default_rng(20 + k)
    block, factors = make_block(rng, k)
    own, other = rng.uniform(0, 2, block.num_rows), rng.uniform(0, 3, len(factors))
    found = []
    real_gufunc = solve_mod._gufunc

    def recording(name):
        found.append(name)
        return real_gufunc(name)

    monkeypatch.setattr(solve_mod, '_gufunc', recording)
    normal = run(block, own, factors, other, w0, lam)
    assert found and all(real_gufunc(n) is not None for n in found), \
        'this numpy has no private gufuncs: the normal path is the fallback'
    assert gufunc in found
    monkeypatch.setattr(solve_mod, '_gufunc', lambda name: None)
    public = run(block, own, factors, other, w0, lam)
    assert_close(public, normal, rtol=1e-7)
    assert_close(public, reference(block, own, factors, other, w0, lam, singular_ok=True),
                 rtol=1e-5 if lam > 0 else 1e-4)


# ----------------------------------------------------------------------------------
# Arguments (the CG solver has its own tests: tests/test_solve_cg.py)
# ----------------------------------------------------------------------------------

def test_bad_arguments():
    rng = np.random.default_rng(22)
    block, factors = make_block(rng, 3, n_rows=10)
    with pytest.raises(ValueError):
        run(block, np.ones(10), factors, np.ones(len(factors)), 0.01, 0.1, solver='lu')
    with pytest.raises(ValueError):
        run(block, np.ones(10), factors, np.ones(len(factors)), 0.01, 0.1, solver='cg',
            x0=np.zeros((3, 3)))


def test_out_of_range_column_is_an_error_not_a_silent_clip():
    factors = np.ones((5, 3), np.float32)
    block = csr_from_triples(np.array([0, 1]), np.array([2, 5]), np.array([1.0, 2.0]), 2)
    with pytest.raises(IndexError):
        run(block, np.ones(2), factors, np.ones(5), 0.01, 0.1)


@pytest.mark.parametrize('w0, lam', [(0.01, 0.1), (0.0, 0.0)])
def test_nan_rating_gives_nan_row_not_silent_garbage(w0, lam):
    """The pipeline checks the factors are finite: a NaN input must stay visible."""
    rng = np.random.default_rng(24)
    block, factors = make_block(rng, 4, lengths=[5, 6, 3, 8])
    values = block.values.copy()
    values[block.indptr[1]] = np.nan
    bad = type(block)(block.indptr, block.indices, values)
    own, other = np.ones(4), rng.uniform(0.5, 2, len(factors))
    got = run(bad, own, factors, other, w0, lam)
    assert np.all(np.isnan(got[1]))
    keep = [0, 2, 3]
    want = reference(block, own, factors, other, w0, lam, singular_ok=True)
    assert_close(got[keep], want[keep], rtol=1e-6)


def test_nan_factor_gives_nan_rows_only_where_used():
    rng = np.random.default_rng(25)
    k = 3
    factors = rng.standard_normal((6, k)).astype(np.float32)
    rows = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    cols = np.array([0, 1, 2, 3, 5, 1, 2, 3, 0, 1, 2, 4])
    block = csr_from_triples(rows, cols, rng.standard_normal(12), 3)
    clean = gramian(factors)
    nan_factors = factors.copy()
    nan_factors[5, 0] = np.nan                       # used by row 1 only
    for w0, lam in ((0.01, 0.1), (0.0, 0.0)):
        got = solve_rows(block, np.ones(3), nan_factors, np.ones(6), clean, w0, lam)
        assert np.all(np.isnan(got[1]))
        assert np.all(np.isfinite(got[[0, 2]]))


def test_chunks_cover_every_row_once_with_bounded_padding(small_pieces):
    rng = np.random.default_rng(26)
    block, factors = make_block(rng, 5, n_rows=300)
    solver = solve_mod.RowSolver(block, np.ones(300), np.ones(len(factors)), 0.01, 0.1, 5)
    lens = np.diff(block.indptr)
    seen = []
    for rows, length in solver.chunks:
        seen.extend(rows.tolist())
        assert lens[rows].max() == length
        assert lens[rows].min() * solve_mod._LENGTH_RATIOS[-1] >= length
        assert len(rows) == 1 or len(rows) * length <= solve_mod._CHUNK_ENTRIES
        assert len(rows) <= max(1, solve_mod._CHUNK_ELEMENTS // 25)
    assert sorted(seen) == np.flatnonzero(lens > 0).tolist()


# ----------------------------------------------------------------------------------
# RowSolver: one block solved again and again with a kept plan
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize('case', ['ones', 'row_weights', 'weights_off', 'zero_and_negative'])
def test_row_solver_reuses_its_plan_across_iterations(case, small_pieces):
    """A kept plan gives the same answers as a fresh one-shot solve, for new factors
    every call, on every path of the exact solver (each checked against the dense
    reference too)."""
    rng = np.random.default_rng(len(case))
    k = 5
    block, factors = make_block(rng, k, n_rows=70)
    m = len(factors)
    own = {'ones': np.ones(70), 'row_weights': rng.uniform(0.5, 2.0, 70),
           'weights_off': np.zeros(70), 'zero_and_negative': np.ones(70)}[case]
    other = {'ones': rng.uniform(0.1, 3.0, m), 'row_weights': rng.uniform(0.1, 3.0, m),
             'weights_off': np.zeros(m),
             'zero_and_negative': np.where(rng.random(m) < 0.3, 0.0,
                                           rng.uniform(-0.02, 2.0, m))}[case]
    solver = solve_mod.RowSolver(block, own, other, 0.05, 0.3, k, num_threads=2)
    assert solver.plan_nbytes == 0
    for it in range(3):
        v = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
        got = solver.solve(v, gramian(v))
        planned = [b for batches in solver._plan for b in batches]
        assert len(planned) > 1
        assert solver.plan_nbytes == sum(b.nbytes for b in planned) > 0  # counted once
        np.testing.assert_array_equal(got, run(block, own, v, other, 0.05, 0.3))
        assert_close(got, reference(block, own, v, other, 0.05, 0.3))


def test_row_solver_checks_its_inputs():
    rng = np.random.default_rng(31)
    block, factors = make_block(rng, 3, n_rows=10)
    m = len(factors)
    with pytest.raises(ValueError, match='self weights'):
        solve_mod.RowSolver(block, np.ones(9), np.ones(m), 0.01, 0.1, 3)
    solver = solve_mod.RowSolver(block, np.ones(10), np.ones(m), 0.01, 0.1, 3)
    with pytest.raises(ValueError, match='shape'):
        solver.solve(factors[:, :2], gramian(factors[:, :2]))
    with pytest.raises(ValueError, match='shape'):
        solver.solve(factors[1:], gramian(factors[1:]))
    one_shot = solve_mod.RowSolver(block, np.ones(10), np.ones(m), 0.01, 0.1, 3,
                                   keep_plan=False)
    one_shot.solve(factors, gramian(factors))
    assert one_shot.plan_nbytes == 0

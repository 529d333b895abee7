"""The conjugate-gradient solver (RowSolver solver='cg', wals_core/cg.py) against the
exact solver, for every objective's solver configuration; warm start; per-row
results independent of threads and batching; and the exact path unchanged."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import wals_core.cg as cg_mod
from tests import exact_golden
from wals_core import objectives
from wals_core.params import WalsParams
from wals_core.solve import RowSolver, gramian, solve_rows
from wals_core.sparse import Csr, csr_from_triples, select_rows
from wals_core.train import Problem, initial_state, train
from wals_core.init import initial_factors
from wals_core.hashing import id_hashes

# CG runs its products in float32: "equal to the exact answer" means to ~1e-6
# relative (times the condition number); these problems are well conditioned.
CG_RTOL = 2e-5


def assert_near(got, want, rtol=CG_RTOL):
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


def ratings(seed: int, n: int = 60, m: int = 45, lengths=None):
    """Random duplicate-free ratings: rows with 0, 1, 2, k, ~m/3 and m entries
    (min(m, ...)), values 1..5 with noise; returns (rows, cols, values)."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        menu = np.array([0, 1, 2, 5, 9, m // 3, m // 2, m])
        lengths = np.concatenate([menu, rng.choice(menu, n - len(menu))])
        rng.shuffle(lengths)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.concatenate([rng.choice(m, int(l), replace=False) for l in lengths]
                          + [np.zeros(0, np.int64)])
    values = rng.integers(1, 6, len(rows)).astype(np.float64) \
        + 0.25 * rng.standard_normal(len(rows))
    return rows, cols, values


# Every objective's RowSolver (objectives.make_solver), both sides.
MODES = {
    'wals': dict(model='wals', latent_factors=6, regularization=0.5),
    'wals-log': dict(model='wals', latent_factors=6, regularization=0.5, wt_type='log'),
    'wals-weights-off': dict(model='wals', latent_factors=6, regularization=0.5,
                             weights=False),
    'implicit': dict(model='implicit', latent_factors=6, regularization=0.3, alpha=2.0),
    'implicit-scaled': dict(model='implicit', latent_factors=6, regularization=0.1,
                            scale_regularization=True),
    'implicit-linear': dict(model='implicit', latent_factors=6, regularization=0.3,
                            confidence='linear', alpha=0.5),
    'explicit': dict(model='explicit', latent_factors=6, regularization=0.1),
}


def mode_problem(name: str, seed: int = 0):
    """(params, Problem, stored U, stored V) of a random problem for a mode."""
    p = WalsParams(**MODES[name])
    n, m = 60, 45
    r, c, a = ratings(seed, n, m)
    problem = Problem.build(r, c, a, n, m, p)
    width = objectives.stored_width(p)
    rng = np.random.default_rng(seed + 100)
    u = (rng.standard_normal((n, width)) / np.sqrt(width)).astype(np.float32)
    v = (rng.standard_normal((m, width)) / np.sqrt(width)).astype(np.float32)
    return p, problem, u, v


def side_solver(p, problem, side: str, **options) -> RowSolver:
    block = problem.by_row if side == 'row' else problem.by_col
    other_rows = problem.by_col.num_rows if side == 'row' else problem.by_row.num_rows
    return objectives.make_solver(block, side, p, problem.col_counts, 0, other_rows,
                                  problem.global_mean, **options)


def side_solve(row_solver: RowSolver, p, other: np.ndarray, **kw) -> np.ndarray:
    factors, offsets = objectives.solve_inputs(other, p)
    return row_solver.solve(factors, gramian(other), other_offsets=offsets, **kw)


# ----------------------------------------------------------------------------------
# Against the exact solver
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize('mode', sorted(MODES))
@pytest.mark.parametrize('side', ['row', 'col'])
def test_cg_with_enough_steps_is_the_exact_solve(mode, side):
    p, problem, u, v = mode_problem(mode, seed=len(mode))
    other = v if side == 'row' else u
    own = u if side == 'row' else v
    solver = side_solver(p, problem, side)
    exact = side_solve(solver, p, other)
    width = objectives.stored_width(p)
    many = side_solve(solver, p, other, solver='cg', cg_steps=4 * width, x0=own)
    assert_near(many, exact)
    cold = side_solve(solver, p, other, solver='cg', cg_steps=4 * width)
    assert_near(cold, exact)
    few = side_solve(solver, p, other, solver='cg', cg_steps=1, x0=own)
    assert np.max(np.abs(few - exact)) > 1e-3 * np.max(np.abs(exact))   # approximate


@pytest.mark.parametrize('mode', sorted(MODES))
def test_warm_start_from_the_exact_answer_stays_there(mode):
    p, problem, u, v = mode_problem(mode, seed=3)
    solver = side_solver(p, problem, 'row')
    exact = side_solve(solver, p, v)
    warm = side_solve(solver, p, v, solver='cg', cg_steps=3, x0=exact)
    assert_near(warm, exact, rtol=2e-6)
    # float32 x0, as the stored factors are passed
    warm32 = side_solve(solver, p, v, solver='cg', cg_steps=3,
                        x0=exact.astype(np.float32))
    assert_near(warm32, exact, rtol=2e-6)


def test_error_decreases_with_steps_from_a_previous_solution():
    p, problem, u, v = mode_problem('implicit', seed=4)
    solver = side_solver(p, problem, 'row')
    exact = side_solve(solver, p, v)
    rng = np.random.default_rng(5)
    previous = exact + 0.1 * rng.standard_normal(exact.shape)
    errors = [np.linalg.norm(side_solve(solver, p, v, solver='cg', cg_steps=s,
                                        x0=previous) - exact) for s in (1, 2, 3, 6)]
    assert errors[0] > errors[1] > errors[2] > errors[3]


def general_reference(block: Csr, own, other, w0, lam, v, entry, row_reg, offsets):
    """Row by row, dense: (Σ_all w_ij v_j v_jᵀ + λ_i I) x = Σ_all w_ij (A_ij - o_j) v_j
    with w_ij = w0 + R_i C_j E_ij observed, w0 otherwise (A = 0 there)."""
    n, m = block.num_rows, len(other)
    k = v.shape[1]
    out = np.zeros((n, k))
    for i in range(n):
        lo, hi = block.indptr[i], block.indptr[i + 1]
        if hi == lo:
            continue
        j = block.indices[lo:hi]
        w = np.full(m, w0)
        w[j] = w0 + own[i] * other[j] * (1.0 if entry is None else entry[lo:hi])
        a = np.zeros(m)
        a[j] = block.values[lo:hi] - (0 if offsets is None else offsets[j])
        reg = lam if row_reg is None else row_reg[i]
        out[i] = np.linalg.solve(v.T @ (w[:, None] * v) + reg * np.eye(k), v.T @ (w * a))
    return out


@pytest.mark.parametrize('case', ['plain', 'row_weights', 'zero_weights', 'entry',
                                  'entry_zero', 'row_reg', 'offsets', 'all'])
def test_generalized_inputs_against_dense_reference(case):
    """The RowSolver's inputs one by one (R_i != 1, C_j = 0, E_ij incl. 0, λ_i, o_j)."""
    rng = np.random.default_rng(len(case) + 10)
    n, m, k = 50, 30, 5
    r, c, a = ratings(len(case), n, m)
    block = csr_from_triples(r, c, a, n)
    own = rng.uniform(0.5, 2.0, n) if case in ('row_weights', 'all') else np.ones(n)
    other = rng.uniform(0.5, 2.0, m)
    if case in ('zero_weights', 'all'):
        other[::4] = 0.0
    entry = row_reg = offsets = None
    if case in ('entry', 'entry_zero', 'all'):
        entry = rng.uniform(0, 4, len(r))
        if case != 'entry':
            entry[::5] = 0.0
    if case in ('row_reg', 'all'):
        row_reg = rng.uniform(0.05, 3, n)
    if case in ('offsets', 'all'):
        offsets = rng.normal(size=m)
    v = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
    w0, lam = 0.3, 0.2
    solver = RowSolver(block, own, other, w0, lam, k, entry_weights=entry,
                       row_regularization=row_reg, offsets=offsets is not None,
                       solver='cg', cg_steps=4 * k)
    want = general_reference(block, own, other, w0, lam, v.astype(np.float64), entry,
                             row_reg, offsets)
    for _ in range(2):                       # the second solve reuses the CG plan
        got = solver.solve(v, gramian(v), other_offsets=offsets)
        assert_near(got, want)
    assert solver.plan_nbytes > 0
    exact = solver.solve(v, gramian(v), other_offsets=offsets, solver='exact')
    assert_near(exact, want, rtol=1e-9)


def test_long_rows_in_pieces(monkeypatch):
    """A row above _PIECE_ELEMENTS is gathered piece by piece in every pass."""
    monkeypatch.setattr(cg_mod, '_PIECE_ELEMENTS', 5 * 16 * 3)     # 16-entry pieces
    rng = np.random.default_rng(12)
    r, c, a = ratings(12, 20, 200, lengths=[0, 3, 40, 150, 200] * 4)
    k = 5
    block = csr_from_triples(r, c, a, 20)
    v = (rng.standard_normal((200, k)) / np.sqrt(k)).astype(np.float32)
    other = rng.uniform(0.5, 2.0, 200)
    solver = RowSolver(block, np.ones(20), other, 0.05, 0.3, k)
    exact = solver.solve(v, gramian(v))
    assert_near(solver.solve(v, gramian(v), solver='cg', cg_steps=4 * k), exact)


# ----------------------------------------------------------------------------------
# Rows without entries, NaN, arguments
# ----------------------------------------------------------------------------------

def test_rows_without_entries_get_zero_and_zero_steps_keep_x0():
    p, problem, u, v = mode_problem('wals', seed=6)
    solver = side_solver(p, problem, 'row')
    empty = np.diff(problem.by_row.indptr) == 0
    assert empty.any()
    start = np.random.default_rng(0).standard_normal(u.shape)
    got = side_solve(solver, p, v, solver='cg', cg_steps=3, x0=start)
    np.testing.assert_array_equal(got[empty], 0.0)
    kept = side_solve(solver, p, v, solver='cg', cg_steps=0, x0=start)
    np.testing.assert_array_equal(kept[~empty], start[~empty])
    np.testing.assert_array_equal(kept[empty], 0.0)
    # a block without any entry, and one without rows
    none = Csr(np.zeros(4, np.int64), np.zeros(0, np.int32), np.zeros(0))
    out = RowSolver(none, np.ones(3), np.ones(45), 0.1, 0.1, 6, solver='cg').solve(
        v, gramian(v), x0=np.ones((3, 6)))
    np.testing.assert_array_equal(out, np.zeros((3, 6)))
    nothing = Csr(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0))
    assert RowSolver(nothing, np.ones(0), np.ones(45), 0.1, 0.1, 6).solve(
        v, gramian(v), solver='cg').shape == (0, 6)


def test_nan_rating_stays_visible_in_its_row_only():
    r, c, a = ratings(7, 10, 30)
    a[np.flatnonzero(r == r[0])[0]] = np.nan
    block = csr_from_triples(r, c, a, 10)
    rng = np.random.default_rng(7)
    v = rng.standard_normal((30, 4)).astype(np.float32)
    got = solve_rows(block, np.ones(10), v, np.ones(30), gramian(v), 0.1, 0.1,
                     solver='cg', cg_steps=3)
    assert np.all(np.isnan(got[r[0]]))
    others = np.setdiff1d(np.arange(10), [r[0]])
    assert np.all(np.isfinite(got[others]))


def test_bad_arguments():
    p, problem, u, v = mode_problem('wals', seed=8)
    solver = side_solver(p, problem, 'row')
    with pytest.raises(ValueError, match='solver'):
        side_solve(solver, p, v, solver='lu')
    with pytest.raises(ValueError, match='cg_steps'):
        side_solve(solver, p, v, solver='cg', cg_steps=-1)
    with pytest.raises(ValueError, match='x0'):
        side_solve(solver, p, v, solver='cg', x0=np.zeros((3, 6)))
    with pytest.raises(ValueError, match='solver'):
        RowSolver(problem.by_row, problem.row_wts, problem.col_wts, 0.1, 0.1, 6,
                  solver='CG')
    with pytest.raises(ValueError, match='solver'):
        WalsParams(solver='gmres')
    for steps in (0, -2, 2.5, True, '3'):
        with pytest.raises(ValueError, match='cg_steps'):
            WalsParams(solver='cg', cg_steps=steps)
    assert WalsParams(solver='cg').cg_steps == 3
    assert (WalsParams().solver, WalsParams().cg_steps) == ('exact', 3)


# ----------------------------------------------------------------------------------
# Same result everywhere
# ----------------------------------------------------------------------------------

def solve_all_modes(num_threads: int, x0_seed: int = 1) -> list[np.ndarray]:
    out = []
    for mode in sorted(MODES):
        p, problem, u, v = mode_problem(mode, seed=9)
        for side, other, own in (('row', v, u), ('col', u, v)):
            solver = side_solver(p, problem, side, num_threads=num_threads)
            out.append(side_solve(solver, p, other, solver='cg', cg_steps=3, x0=own))
    return out


def test_same_result_for_any_threads_and_run(monkeypatch):
    monkeypatch.setattr(cg_mod, '_CG_ELEMENTS', 300)     # many batches to share out
    one = solve_all_modes(1)
    again = solve_all_modes(1)
    for threads in (2, 3):
        for a, b in zip(one, solve_all_modes(threads)):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(one, again):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('elements', [1, 200, 5000, 1 << 20])
def test_rows_do_not_depend_on_batching(monkeypatch, elements):
    """A row's answer is bit-identical whatever rows share its batch: batch sizes from
    one row to all, and a block of a subset of the rows in another order."""
    rng = np.random.default_rng(13)
    n, m, k = 80, 60, 7
    r, c, a = ratings(13, n, m)
    block = csr_from_triples(r, c, a, n)
    own = rng.uniform(0.5, 2, n)
    other = rng.uniform(0.1, 2, m)
    entry = rng.uniform(0, 3, len(r))
    row_reg = rng.uniform(0.1, 1, n)
    offsets = rng.normal(size=m)
    v = rng.standard_normal((m, k)).astype(np.float32)
    x0 = rng.standard_normal((n, k)).astype(np.float32)

    def solve(blk, rows, ent):
        return RowSolver(blk, own[rows], other, 0.2, 0.1, k, entry_weights=ent,
                         row_regularization=row_reg[rows], offsets=True,
                         solver='cg').solve(v, gramian(v), other_offsets=offsets,
                                            x0=x0[rows])

    want = solve(block, np.arange(n), entry)
    monkeypatch.setattr(cg_mod, '_CG_ELEMENTS', elements)
    np.testing.assert_array_equal(solve(block, np.arange(n), entry), want)
    subset = rng.permutation(n)[: n // 3]
    indptr, indices = select_rows(block.indptr, block.indices, subset)
    pos = np.concatenate([np.arange(block.indptr[i], block.indptr[i + 1]) for i in subset])
    sub = Csr(indptr, indices.astype(np.int32), block.values[pos])
    np.testing.assert_array_equal(solve(sub, subset, entry[pos]), want[subset])


def test_padded_lengths_depend_on_the_count_only():
    counts = np.arange(0, 5000)
    padded = cg_mod.padded_lengths(counts)
    assert np.all(padded >= counts) and np.all(padded % cg_mod._ALIGN == 0)
    assert np.all((padded - counts <= 15) | (padded <= counts * 1.0625 + 16))
    for part in (counts[::7], counts[3000:], counts[:20]):
        np.testing.assert_array_equal(cg_mod.padded_lengths(part), padded[part])


# ----------------------------------------------------------------------------------
# The in-memory trainer
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize('model', ['wals', 'implicit', 'explicit'])
def test_trainer_with_cg_reaches_the_exact_objective(model):
    """Warm-started CG (3 steps) ends within 1% of the exact solver's objective, and
    every iteration lowers it after the first (each CG half-step starts where the
    row was, and CG only lowers a positive definite quadratic from there)."""
    kw = dict(MODES[model], num_iters=20)
    r, c, a = ratings(20, 120, 70)
    exact_p = WalsParams(**kw)
    cg_p = WalsParams(**kw, solver='cg')
    problem = Problem.build(r, c, a, 120, 70, exact_p)
    k = exact_p.latent_factors
    inits = (initial_factors(id_hashes(range(120)), k, 0, 'row'),
             initial_factors(id_hashes(range(70)), k, 0, 'col'))

    def run(p):
        u0, v0 = initial_state(*inits, p)
        history = []
        u, v = train(problem, p, u0, v0, on_half_step=lambda it, side, u, v: history.append(
            objectives.objective(problem.by_row, problem.col_counts, u, v, p,
                                 problem.global_mean)) if side == 'col' else None)
        return u, v, history

    _, _, exact_hist = run(exact_p)
    u, v, cg_hist = run(cg_p)
    assert u.dtype == np.float32 and u.shape == (120, objectives.stored_width(cg_p))
    assert cg_hist[-1] == pytest.approx(exact_hist[-1], rel=1e-2)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(cg_hist[1:], cg_hist[2:]))
    assert cg_hist[-1] != exact_hist[-1]               # it is the CG path indeed


GOLDEN = pathlib.Path(__file__).parent / 'data' / 'exact_golden.json'


def test_exact_path_is_bit_identical_to_before_cg(ml100k, tmp_path):
    """The default (exact) solver's model files, through the Beam pipeline and the
    in-memory trainer for every mode, have the digests that the code before the CG
    solver gave (tests/exact_golden.py made tests/data/exact_golden.json at 726a58f)."""
    golden = json.loads(GOLDEN.read_text())
    if golden['platform'] != exact_golden.platform():
        pytest.skip(f'golden digests were made on {golden["platform"]}, this is '
                    f'{exact_golden.platform()}: float results differ by BLAS build')
    assert exact_golden.digests(ml100k, tmp_path) == golden['digests']

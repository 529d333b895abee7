"""Convergence history, --tolerance pass-through, --eval_every checkpoints and the
comparison with a previous model, through the real pipeline."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.options import ConfigError
from tests.conftest import write_ratings
from tests.pipeline_support import load_model, make_config, run_pipeline, train_in_memory
from wals_core import objectives
from wals_core.train import Problem


def test_history_records_the_objective_of_every_iteration(small_ratings, tmp_path):
    args = ['--num_iters', '4', '--block_size', '16', '--latent_factors', '3', '--eval_every', '2']
    metrics = run_pipeline(small_ratings, tmp_path / 'out', *args)
    history = metrics['history']
    assert [h['iteration'] for h in history] == [1, 2, 3, 4]
    assert all(h['solved'] for h in history) and metrics['iterations_run'] == 4
    objective = [h['objective'] for h in history]
    assert np.all(np.diff(objective) <= 1e-6 * np.abs(objective[:-1]))     # wals: ALS
    # The last entry is the objective of the published factors, computed independently.
    want = train_in_memory(small_ratings, make_config('--input', str(small_ratings), *args))
    model = load_model(tmp_path / 'out')
    p = make_config('--input', 'x', *args).params
    data = np.loadtxt(small_ratings, dtype=np.int64)
    users, items = list(model['user']), list(model['item'])
    r = np.array([users.index(u) for u in data[:, 0]])
    c = np.array([items.index(i) for i in data[:, 1]])
    train_r, train_c = want['train_pairs']
    keep = np.isin(r * 1000 + c, train_r * 1000 + train_c)
    problem = Problem.build(r[keep], c[keep], data[keep, 2].astype(float), len(users),
                            len(items), p)
    value = objectives.objective(problem.by_row, problem.col_counts, model['row'], model['col'], p)
    # the history's products are float32 (the stored factors), its sums float64
    assert history[-1]['objective'] == pytest.approx(value, rel=1e-7)
    assert history[-1]['train_rmse'] == pytest.approx(metrics['train_rmse'], rel=1e-7)
    # --eval_every 2: iteration 2 carries its test metrics (4 is the final evaluation).
    assert 'test' in history[1] and 'test' not in history[0] and 'test' not in history[3]
    assert history[1]['test']['test_ratings'] == metrics['test_ratings']
    assert history[1]['test']['test_rmse'] != metrics['test_rmse']


def test_tolerance_passes_the_factors_through_once_converged(small_ratings, tmp_path):
    base = ['--num_iters', '8', '--block_size', '16', '--latent_factors', '3']
    full = run_pipeline(small_ratings, tmp_path / 'full', *base)
    early = run_pipeline(small_ratings, tmp_path / 'early', *base, '--tolerance', '0.05')
    ran = early['iterations_run']
    assert 1 < ran < 8
    history = early['history']
    assert [h['solved'] for h in history] == [True] * ran + [False] * (8 - ran)
    # after convergence the factors (and so the objective) stop changing
    assert len({h['objective'] for h in history[ran - 1:]}) == 1
    # and they are the factors the full run had after `ran` iterations
    run_pipeline(small_ratings, tmp_path / 'short', *base[:1], str(ran), *base[2:])
    for name in ('row', 'col'):
        assert np.array_equal(load_model(tmp_path / 'early')[name],
                              load_model(tmp_path / 'short')[name]), name
    assert full['iterations_run'] == 8


@pytest.mark.parametrize('exchange', ['broadcast', 'routed'])
def test_objective_every_n_computes_fewer_objectives_and_the_same_model(
        small_ratings, tmp_path, exchange):
    base = ['--num_iters', '5', '--block_size', '16', '--latent_factors', '3',
            '--exchange', exchange, '--eval_every', '3']
    every = run_pipeline(small_ratings, tmp_path / 'every', *base)
    sparse = run_pipeline(small_ratings, tmp_path / 'sparse', *base, '--objective_every', '2')
    last = run_pipeline(small_ratings, tmp_path / 'last', *base, '--objective_every', '0')
    for f in ('row', 'col', 'user', 'item'):
        assert np.array_equal(load_model(tmp_path / 'sparse')[f],
                              load_model(tmp_path / 'every')[f]), f
        assert np.array_equal(load_model(tmp_path / 'last')[f],
                              load_model(tmp_path / 'every')[f]), f
    # one entry per iteration; the objective where computed (2, 4 and the last),
    # the same value as when every iteration's is computed
    full = [h['objective'] for h in every['history']]
    assert [h['objective'] for h in sparse['history']] == [None, full[1], None, full[3],
                                                           full[4]]
    assert [h['objective'] for h in last['history']] == [None] * 4 + [full[4]]
    assert [h['train_rmse'] is None for h in sparse['history']] == [True, False, True,
                                                                   False, False]
    assert sparse['final_objective'] == every['final_objective'] == full[4]
    assert sparse['iterations_run'] == last['iterations_run'] == 5
    assert all(h['solved'] for h in sparse['history'])
    assert all(h['seconds'] is not None for h in sparse['history'])
    # a checkpoint lands on an iteration without an objective all the same
    assert sparse['history'][2]['test'] == every['history'][2]['test']
    assert sparse['test_rmse'] == every['test_rmse']


def test_tolerance_with_objective_every_compares_computed_objectives(small_ratings, tmp_path):
    base = ['--num_iters', '8', '--block_size', '16', '--latent_factors', '3']
    early = run_pipeline(small_ratings, tmp_path / 'early', *base, '--tolerance', '0.05',
                         '--objective_every', '2')
    history = early['history']
    ran = early['iterations_run']
    # the test runs where an objective was computed: the run stops after an even
    # iteration, and every entry after it passed its factors through
    assert ran % 2 == 0 and 2 <= ran < 8
    assert [h['solved'] for h in history] == [True] * ran + [False] * (8 - ran)
    assert [h['objective'] is not None for h in history] == [i % 2 == 0 or i == 8
                                                            for i in range(1, 9)]
    run_pipeline(small_ratings, tmp_path / 'short', *base[:1], str(ran), *base[2:])
    for name in ('row', 'col'):
        assert np.array_equal(load_model(tmp_path / 'early')[name],
                              load_model(tmp_path / 'short')[name]), name


@pytest.mark.parametrize('args, message', [
    (['--objective_every', '-1'], '--objective_every must be 0 or more'),
    (['--objective_every', '0', '--tolerance', '0.01'], 'needs --objective_every 1 or more'),
])
def test_objective_every_refuses_what_cannot_work(args, message):
    with pytest.raises(ConfigError, match=message):
        make_config('--input', 'x', *args)


def test_previous_model_is_compared_on_the_same_pairs(tmp_path):
    rng = np.random.default_rng(3)
    pairs = rng.choice(90 * 60, size=2500, replace=False)
    users, items, ratings = pairs // 60 + 1, pairs % 60 + 1, rng.integers(1, 6, 2500)
    old = write_ratings(tmp_path / 'old.tsv', users[:2000], items[:2000], ratings[:2000])
    new = write_ratings(tmp_path / 'new.tsv', users[200:], items[200:], ratings[200:])
    args = ['--model', 'explicit', '--num_iters', '3', '--block_size', '32',
            '--latent_factors', '3']
    run_pipeline(old, tmp_path / 'v1', *args)
    metrics = run_pipeline(new, tmp_path / 'v2', *args, '--previous_model', str(tmp_path / 'v1'))
    cmp = metrics['comparison']
    # independent: both published models predict the same pairs
    v1, v2 = load_model(tmp_path / 'v1'), load_model(tmp_path / 'v2')
    want = train_in_memory(new, make_config('--input', str(new), *args))
    tr, tc, ta = want['test_pairs']
    uid, iid = v2['user'][tr], v2['item'][tc]
    u1, i1 = {u: n for n, u in enumerate(v1['user'])}, {i: n for n, i in enumerate(v1['item'])}
    known = np.array([u in u1 and i in i1 for u, i in zip(uid, iid)])
    assert cmp['pairs'] == int(known.sum()) > 0
    lo, hi = metrics['rmse_clipped_to']

    def rmse(model, rows, cols):
        pred = (float(model['global_mean']) + model['row_bias'][rows] + model['col_bias'][cols]
                + np.einsum('ij,ij->i', model['row'][rows].astype(float),
                            model['col'][cols].astype(float)))
        return float(np.sqrt(np.mean((np.clip(pred, lo, hi) - ta[known]) ** 2)))
    rows1 = np.array([u1[u] for u in uid[known]])
    cols1 = np.array([i1[i] for i in iid[known]])
    assert cmp['previous']['test_rmse'] == pytest.approx(rmse(v1, rows1, cols1), rel=1e-5)
    assert cmp['new']['test_rmse'] == pytest.approx(rmse(v2, tr[known], tc[known]), rel=1e-5)
    changes = metrics['changes']
    assert changes['users_added'] == len(set(users[200:]) - set(users[:2000]))
    assert changes['users_removed'] == len(set(users[:2000]) - set(users[200:]))
    assert changes['warm_started_items'] == changes['items_kept']


def test_two_runs_with_vocabularies_of_one_size_map_the_previous_model_each_its_own_way(
        tmp_path):
    """Two runs in one process (the in-memory DirectRunner) compare with the same
    previous model; their user vocabularies have the same size but other IDs. The
    second run's comparison must use its own ID mapping (a cache keyed by the
    vocabulary sizes gave it the first run's: every user known)."""
    rng = np.random.default_rng(5)
    pairs = rng.choice(90 * 60, size=2500, replace=False)
    users, items, ratings = pairs // 60 + 1, pairs % 60 + 1, rng.integers(1, 6, 2500)
    args = ['--model', 'explicit', '--num_iters', '2', '--block_size', '32',
            '--latent_factors', '3']
    old = write_ratings(tmp_path / 'old.tsv', users, items, ratings)
    run_pipeline(old, tmp_path / 'v1', *args)
    renamed = np.where(users > 45, users + 1000, users)     # 90 users either way
    same_ids = write_ratings(tmp_path / 'same.tsv', users, items, ratings)
    other_ids = write_ratings(tmp_path / 'other.tsv', renamed, items, ratings)
    beam_args = ['--direct_running_mode', 'in_memory']
    extra = ['--previous_model', str(tmp_path / 'v1')]
    first = run_pipeline(same_ids, tmp_path / 'a', *args, *extra, beam_args=beam_args)
    second = run_pipeline(other_ids, tmp_path / 'b', *args, *extra, beam_args=beam_args)
    assert first['users'] == second['users'] == 90
    # Independently: the second run's warm test pairs whose user v1 knows.
    want = train_in_memory(other_ids, make_config('--input', str(other_ids), *args))
    test_users = want['user'][want['test_pairs'][0]]
    known = int(np.isin(test_users, load_model(tmp_path / 'v1')['user']).sum())
    assert 0 < known < first['comparison']['pairs']
    assert second['comparison']['pairs'] == known

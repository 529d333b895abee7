"""--solver cg through the real Beam pipeline (DirectRunner): the same factors as
wals_core.train with the same parameters, to the bit, for every --model; the same
files from the broadcast and the routed exchange; a bad --cg_steps is exit 2 with
one error line; the same files under 1 and 2 BLAS threads."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest

from pipeline.io.synth import generate_ratings, write_movielens
from tests.conftest import assert_same_outputs, write_ratings
from tests.pipeline_support import (load_metrics, load_model, make_config, run_pipeline,
                                    train_in_memory)
from tests.test_cli import train_cli
from tests.test_thread_independence import THREADS, _env

MODELS = ('wals', 'implicit', 'explicit')
# Blocks of 300 users / items: several blocks per side, so every block's warm start
# is its own slice of the previous factors.
CG = ('--num_iters', '4', '--block_size', '300', '--latent_factors', '8', '--solver', 'cg')


@pytest.mark.parametrize('model', MODELS)
def test_cg_pipeline_matches_the_in_memory_trainer_to_the_bit(ml100k, tmp_path, monkeypatch,
                                                             model):
    args = ['--model', model, *CG, '--cg_steps', '2']
    metrics = run_pipeline(ml100k, tmp_path / 'out', *args)
    got = load_model(tmp_path / 'out')
    want = train_in_memory(ml100k, make_config('--input', str(ml100k), *args))
    names = ('row', 'col', 'row_bias', 'col_bias') if model == 'explicit' else ('row', 'col')
    for name in names:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    if model != 'implicit':
        assert metrics['test_rmse'] == pytest.approx(want['test_rmse'], abs=1e-5)
    assert (metrics['parameters']['solver'], metrics['parameters']['cg_steps']) == ('cg', 2)
    manifest = json.loads((tmp_path / 'out' / '_SUCCESS').read_text())
    assert manifest['parameters'] == metrics['parameters']
    # The option takes effect: CG's 2 steps per row are not the exact solve ...
    exact = train_in_memory(ml100k, make_config(
        '--input', str(ml100k), *[a if a != 'cg' else 'exact' for a in args]))
    assert not np.array_equal(got['row'], exact['row'])
    # ... and they are warm-started: 2 steps from 0 in every iteration end elsewhere.
    cold = _cold_start_fit(ml100k, make_config('--input', str(ml100k), *args), monkeypatch)
    assert not np.array_equal(got['row'], cold)


def _cold_start_fit(path, config, monkeypatch) -> np.ndarray:
    """U of wals_core.train's iterations with every CG half-step started from 0."""
    import wals_core.train as core
    original, starts = core.solve_side, []

    def cold(problem, side, other, params, own=None):
        starts.append(own is not None)
        return original(problem, side, other, params, own=None)
    monkeypatch.setattr(core, 'solve_side', cold)
    u = train_in_memory(path, config)['row']
    monkeypatch.undo()
    assert any(starts)     # the real trainer does pass a start after iteration 1
    return u


@pytest.fixture(scope='module')
def sparse_ratings(tmp_path_factory):
    """300 users × 400 items, 3000 ratings: a block of 32 refers to fewer than all
    rows of the other side (tests/test_exchange.py's data)."""
    rng = np.random.default_rng(8)
    pairs = rng.choice(300 * 400, size=3000, replace=False)
    return write_ratings(tmp_path_factory.mktemp('cg') / 'ratings.tsv',
                         pairs // 400 + 1, pairs % 400 + 1, rng.integers(1, 6, size=3000))


@pytest.mark.parametrize('model', MODELS)
def test_broadcast_and_routed_give_identical_files(sparse_ratings, tmp_path, model):
    common = ('--model', model, '--num_iters', '4', '--latent_factors', '4',
              '--block_size', '32', '--solver', 'cg')
    runs = {'broadcast': ('--exchange', 'broadcast'), 'routed': ('--exchange', 'routed'),
            # users broadcast, items routed
            'auto': ('--exchange', 'auto', '--max_broadcast_mb', '0.006')}
    metrics = {}
    for name, args in runs.items():
        train_cli('--input', str(sparse_ratings), '--output', str(tmp_path / name),
                  *common, *args)
        metrics[name] = load_metrics(tmp_path / name)
    files = sorted(p.name for p in (tmp_path / 'broadcast' / 'model').glob('*.npy'))
    assert {'row.npy', 'col.npy'} <= set(files)
    for name in runs:
        for f in files:
            assert ((tmp_path / name / 'model' / f).read_bytes()
                    == (tmp_path / 'broadcast' / 'model' / f).read_bytes()), (name, f)
        assert [h['objective'] for h in metrics[name]['history']] == \
            [h['objective'] for h in metrics['broadcast']['history']], name
    # and the exact solver's model is another one
    train_cli('--input', str(sparse_ratings), '--output', str(tmp_path / 'exact'),
              *common[:-1], 'exact', '--exchange', 'routed')
    assert (tmp_path / 'exact' / 'model' / 'row.npy').read_bytes() != \
        (tmp_path / 'broadcast' / 'model' / 'row.npy').read_bytes()


def test_a_bad_solver_name_is_exit_2(small_ratings, tmp_path):
    proc = train_cli('--input', str(small_ratings), '--output', str(tmp_path / 'o'),
                     '--solver', 'lu', check=False)
    assert proc.returncode == 2 and '--solver' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_cg_files_are_the_same_under_1_and_2_blas_threads(tmp_path):
    """One row block of 6,000 users (~60k ratings): the CG's products over the block
    are large enough for a threaded BLAS to sum them in another order."""
    users, items, ratings, stamps = generate_ratings(6_000, 1_500, 60_000, seed=5)
    write_movielens(str(tmp_path / 'ratings.tsv'), users, items, ratings, stamps)
    procs = [subprocess.Popen(
        [sys.executable, '-m', 'pipeline.train', '--input', 'ratings.tsv', '--output',
         str(tmp_path / f'out-{n}'), '--model', 'implicit', '--latent_factors', '16', '--num_iters', '4',
         '--solver', 'cg', '--eval_every', '1'],
        cwd=tmp_path, env=_env(n), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for n in THREADS]
    for n, p in zip(THREADS, procs):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f'{n} thread(s): exit {p.returncode}\n{out[-3000:]}'
    hashes = assert_same_outputs(tmp_path / 'out-1', tmp_path / 'out-2')
    assert any(name.endswith('row.npy') for name in hashes)
    assert load_metrics(tmp_path / 'out-1')['parameters']['solver'] == 'cg'


def test_the_tuner_takes_the_solver_as_a_fixed_parameter(tmp_path, capsys):
    """python -m pipeline.tune --solver cg: every trial trains with CG, best.json
    records it as fixed, and its command trains with it."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.cli import tune
    from pipeline.options import config_from_options
    users, items, ratings, stamps = generate_ratings(200, 150, 6_000, seed=2)
    data = tmp_path / 'ratings.tsv'
    write_movielens(str(data), users, items, ratings, stamps)
    common = ['--input', str(data), '--model', 'implicit', '--trials', '1',
              '--num_iters', '4', '--direct_running_mode', 'in_memory']
    best = {}
    for solver in ('exact', 'cg'):
        assert tune.main([*common, '--output', str(tmp_path / solver),
                          '--solver', solver, '--cg_steps', '2']) == 0
        best[solver] = json.loads((tmp_path / solver / 'best.json').read_text())
    assert best['cg']['fixed']['solver'] == 'cg' and best['cg']['fixed']['cg_steps'] == 2
    assert 'solver' not in best['exact']['fixed']      # the default, as before
    assert best['cg']['params'] == best['exact']['params']        # trial 0: the defaults
    assert best['cg']['value'] != best['exact']['value']
    argv = shlex.split(best['cg']['command'])[3:]
    params = config_from_options(PipelineOptions(argv)).params
    assert (params.solver, params.cg_steps) == ('cg', 2)
    with pytest.raises(SystemExit) as exc:
        tune.main([*common, '--output', str(tmp_path / 'bad'), '--cg_steps', '0'])
    assert exc.value.code == 2
    assert '--cg_steps must be at least 1' in capsys.readouterr().err


def test_fold_in_of_a_cg_model_is_the_exact_solve(small_ratings, tmp_path):
    """A model trained with --solver cg records it; serving's fold-in still solves
    a new user's row exactly (CG would start it from 0)."""
    from pipeline.serving.recommender import Recommender
    from tests.test_recommender import _dense_fold_in
    run_pipeline(small_ratings, tmp_path / 'out', '--model', 'implicit', '--num_iters', '2',
                 '--latent_factors', '6', '--solver', 'cg', '--cg_steps', '1')
    rec = Recommender.load(str(tmp_path / 'out'))
    assert (rec.params.solver, rec.params.cg_steps) == ('cg', 1)
    cols = np.array([0, 3, 7, 11, 20, 25, 30])
    values = np.array([5.0, 1, 3, 4, 2, 5, 4])
    got = rec.fold_in([(rec.item_id(j), r) for j, r in zip(cols, values)])
    want = _dense_fold_in(rec, cols, values)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

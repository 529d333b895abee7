"""python -m pipeline.tune end to end on the DirectRunner, and its data split and
scoring against independent computations."""
from __future__ import annotations

import io
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from pipeline.cli import tune
from pipeline.tuning import search
from pipeline.cli.synth import main as synth_main
from pipeline.cli.common import split_beam_args
from pipeline.cli.train import build_parser as train_parser
from pipeline.options import config_from_options
from pipeline.tuning.data import DataConfig, PrepareTuning, load_data
from pipeline.tuning.trials import (SPACES, TrialSettings, search_space,
                                  validation_ndcg)
from tests.conftest import write_ratings
from wals_core.defaults import model_defaults
from wals_core.hashing import id_hashes, is_test
from wals_core.init import initial_factors
from wals_core.train import Problem, initial_state, train

IN_MEMORY = ['--direct_running_mode', 'in_memory']


@pytest.fixture(scope='module')
def synth(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp('synth') / 'ratings.tsv'
    synth_main(['--users', '200', '--items', '150', '--ratings', '6000',
                '--output', str(path)])
    return path


def read_file(path) -> pd.DataFrame:
    return pd.read_csv(path, sep='\t', header=None, names=['user', 'item', 'rating', 'ts'],
                       dtype={'user': str, 'item': str})


def run_tune(input_path, output, *args: str, beam_args=IN_MEMORY) -> dict:
    code = tune.main(['--input', str(input_path), '--output', str(output), *args,
                      *beam_args])
    assert code == 0
    return json.loads((pathlib.Path(output) / 'best.json').read_text())


@pytest.fixture(scope='module')
def explicit_run(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp('tune') / 'explicit'
    best = run_tune(synth, out, '--model', 'explicit', '--metric', 'rmse', '--trials', '4',
                    '--parallel', '2', '--search_seed', '1')
    return out, best


def test_four_trials_table_and_best(explicit_run):
    out, best = explicit_run
    table = pd.read_csv(out / 'trials.csv')
    assert list(table['number']) == [0, 1, 2, 3]
    assert list(table.columns) == ['number', 'latent_factors', 'regularization', 'rmse',
                                   'state', 'error', 'seconds']
    assert (table['state'] == 'complete').all()
    assert table['rmse'].between(0.3, 2.0).all()
    # Trial 0 is the mode's defaults; the others are proposals inside the search ranges.
    assert table.loc[0, 'latent_factors'] == model_defaults('explicit')['latent_factors']
    assert table.loc[0, 'regularization'] == model_defaults('explicit')['regularization']
    for name, r in SPACES['explicit'].items():
        assert table[name].between(r.low, r.high).all()
    assert table['regularization'].nunique() == 4
    row = table.loc[table['rmse'].idxmin()]
    assert best['value'] == row['rmse'] and best['trial'] == row['number']
    assert best['params'] == {'latent_factors': int(row['latent_factors']),
                              'regularization': row['regularization']}
    assert best['data']['users'] == 200 and best['data']['validation_ratings'] > 0
    assert not (out / search.WORK).exists()


def test_an_earlier_search_is_kept_without_overwrite(explicit_run, synth, capsys):
    out, _ = explicit_run
    before = (out / 'trials.csv').read_bytes()
    with pytest.raises(SystemExit) as exc:
        tune.main(['--input', str(synth), '--output', str(out), '--model', 'explicit',
                   '--trials', '1', *IN_MEMORY])
    assert exc.value.code == 2 and '--overwrite' in capsys.readouterr().err
    assert (out / 'trials.csv').read_bytes() == before


def test_best_command_parses_with_the_trainer_parser(explicit_run, synth):
    _, best = explicit_run
    argv = shlex.split(best['command'])
    assert argv[:3] == ['python', '-m', 'pipeline.train']
    _, rest = train_parser().parse_known_args(argv[3:])
    assert split_beam_args(rest) == []
    config = config_from_options(PipelineOptions(argv[3:]))
    assert config.input == str(synth)
    assert config.params.model == 'explicit'
    assert config.params.latent_factors == best['params']['latent_factors']
    assert config.params.regularization == best['params']['regularization']
    assert config.params.num_iters == model_defaults('explicit')['num_iters']
    assert (config.split_seed, config.test_fraction, config.seed) == (0, 0.1, 0)


@pytest.mark.parametrize('model', ['wals', 'implicit', 'explicit'])
def test_mode_defaults_are_the_trainer_defaults(model):
    params = config_from_options(PipelineOptions(['--input', 'x', '--model', model])).params
    assert TrialSettings(model, 'ndcg', model_defaults(model)['num_iters'], 0).params({}) \
        == params


def test_same_seed_same_trials_other_seed_other_trials(synth, tmp_path):
    args = ['--model', 'wals', '--trials', '4', '--parallel', '2', '--num_iters', '5']
    tables = []
    for name, seed in (('a', '7'), ('b', '7'), ('c', '8')):
        run_tune(synth, tmp_path / name, *args, '--search_seed', seed)
        tables.append(pd.read_csv(tmp_path / name / 'trials.csv').drop(columns='seconds'))
    assert list(tables[0].columns)[1:5] == ['latent_factors', 'regularization',
                                            'unobs_weight', 'feature_wt_factor']
    pd.testing.assert_frame_equal(tables[0], tables[1])
    assert not tables[0].iloc[1:].equals(tables[2].iloc[1:])


def test_default_runner_runs_trials_in_threads_with_the_same_results(explicit_run, synth,
                                                                    tmp_path):
    direct = search.beam_options([], 4).view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == \
        ('multi_threading', min(4, os.cpu_count()))
    assert search.beam_options([], 1).view_as(DirectOptions).direct_running_mode == 'in_memory'
    assert search.beam_options(IN_MEMORY, 4).view_as(DirectOptions).direct_num_workers == 1
    out, _ = explicit_run
    run_tune(synth, tmp_path / 'threads', '--model', 'explicit', '--metric', 'rmse',
             '--trials', '4', '--parallel', '2', '--search_seed', '1', beam_args=())
    threads = pd.read_csv(tmp_path / 'threads' / 'trials.csv')
    pd.testing.assert_frame_equal(threads.drop(columns='seconds'),
                                  pd.read_csv(out / 'trials.csv').drop(columns='seconds'))


def prepare(input_path, folder: pathlib.Path, **kw):
    config = DataConfig(str(input_path), '\t', False, 'ratings', 0.001,
                        kw.pop('test_fraction', 0.1), kw.pop('split_seed', 0), **kw)
    path = str(folder / 'data.npz')
    with beam.Pipeline(options=PipelineOptions(IN_MEMORY)) as p:
        _ = p | PrepareTuning(config, path)
    return load_data(path)


def pairs_of(data, which: str) -> set:
    rows, cols = getattr(data, f'{which}_rows'), getattr(data, f'{which}_cols')
    return set(zip(data.user_ids[rows].astype(str).tolist(),
                   data.item_ids[cols].astype(str).tolist()))


def test_validation_is_carved_from_training_pairs_never_test(synth, tmp_path):
    data = prepare(synth, tmp_path, split_seed=3, test_fraction=0.2)
    ratings = read_file(synth)
    test = is_test(id_hashes(ratings['user']), id_hashes(ratings['item']), 3, 0.2)
    test_pairs = set(zip(ratings['user'][test], ratings['item'][test]))
    train_pairs = set(zip(ratings['user'][~test], ratings['item'][~test]))
    val, fit = pairs_of(data, 'val'), pairs_of(data, 'train')
    assert len(val) > 0.05 * len(train_pairs)
    assert not val & test_pairs and not fit & test_pairs and not val & fit
    assert val | fit <= train_pairs
    assert len(val) + len(fit) + data.val_cold_pairs == len(train_pairs)
    assert data.test_pairs == len(test_pairs)
    # The values are the file's.
    by_pair = dict(zip(zip(ratings['user'], ratings['item']), ratings['rating']))
    users = data.user_ids[data.val_rows].astype(str)
    items = data.item_ids[data.val_cols].astype(str)
    assert [by_pair[(u, i)] for u, i in zip(users, items)] == data.val_values.tolist()


def test_sample_users_restricts_the_users_by_a_stable_choice(synth, tmp_path):
    data = prepare(synth, tmp_path, sample_users=50)
    assert data.num_users == 50 and data.input_users == 200
    kept = set(data.user_ids.astype(str).tolist())
    # Every rating of a kept user, and no other, is in one of the splits.
    ratings = read_file(synth)
    mine = ratings[ratings['user'].isin(kept)]
    assert len(data.train_values) + len(data.val_values) + data.val_cold_pairs \
        + data.test_pairs == len(mine)
    # Another file order (and so other read chunks) keeps the same users.
    shuffled = ratings.sample(frac=1.0, random_state=5)
    (tmp_path / 'b').mkdir()
    other = write_ratings(tmp_path / 'b' / 'shuffled.tsv', shuffled['user'], shuffled['item'],
                          shuffled['rating'])
    again = prepare(other, tmp_path / 'b', sample_users=50)
    assert set(again.user_ids.astype(str).tolist()) == kept
    np.testing.assert_array_equal(again.val_values, data.val_values)
    # A smaller sample is a subset (smallest salted hashes first).
    assert set(prepare(synth, tmp_path, sample_users=20).user_ids.astype(str).tolist()) < kept


def test_sample_users_end_to_end(synth, tmp_path):
    best = run_tune(synth, tmp_path / 'out', '--model', 'implicit', '--trials', '2',
                    '--parallel', '2', '--sample_users', '60', '--num_iters', '3')
    assert best['metric'] == 'ndcg_at_10' and 0 <= best['value'] <= 1
    assert best['data']['users'] == 60 and best['data']['input_users'] == 200
    assert '--sample_users' not in best['command']   # the command trains on everything


def test_rmse_is_refused_for_implicit(synth, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        tune.main(['--input', str(synth), '--output', str(tmp_path / 'o'), '--model',
                   'implicit', '--metric', 'rmse'])
    assert exc.value.code == 2
    assert '--metric rmse does not apply to --model implicit' in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()


def test_too_many_bad_lines_fail_as_in_the_trainer(tmp_path, capsys):
    path = tmp_path / 'bad.tsv'
    path.write_text(''.join(f'{u}\t{u % 7}\t{u % 5 + 1}\n' for u in range(300))
                    + 'not a rating line\n' * 5)
    assert tune.main(['--input', str(path), '--output', str(tmp_path / 'o'), '--trials', '1',
                      *IN_MEMORY]) == 1
    err = capsys.readouterr().err
    assert '5 of 305 lines' in err and '--max_bad_fraction' in err
    assert not (tmp_path / 'o' / 'trials.csv').exists()


def test_search_spaces_follow_the_mode():
    assert list(search_space('wals', 'linear')) == ['latent_factors', 'regularization',
                                                    'unobs_weight', 'feature_wt_factor']
    assert list(search_space('wals', 'log'))[-1] == 'feature_wt_exp'
    assert list(search_space('implicit')) == ['latent_factors', 'regularization', 'alpha',
                                              'epsilon']
    assert 'epsilon' not in search_space('implicit', confidence='linear')
    assert list(search_space('explicit')) == ['latent_factors', 'regularization']
    for model, space in SPACES.items():
        for name, r in space.items():
            if name in model_defaults(model):
                assert r.low <= model_defaults(model)[name] <= r.high, (model, name)


def naive_ndcg(u, v, params, train_pairs, val, threshold, k=10):
    """Per-user loop: rank every unseen item by score (ties by index), NDCG@k."""
    kk = params.latent_factors
    scores = u[:, :kk].astype(np.float32) @ v[:, :kk].astype(np.float32).T
    if params.model == 'explicit':
        scores = scores + v[:, kk].astype(np.float32)
    seen: dict = {}
    for r, c in train_pairs:
        seen.setdefault(r, set()).add(c)
    relevant: dict = {}
    for r, c, x in val:
        if x >= threshold:
            relevant.setdefault(r, set()).add(c)
    total = 0.0
    for user, rel in relevant.items():
        order = sorted((c for c in range(v.shape[0]) if c not in seen.get(user, ())),
                       key=lambda c: (-scores[user, c], c))[:k]
        dcg = sum(1 / math.log2(i + 2) for i, c in enumerate(order) if c in rel)
        idcg = sum(1 / math.log2(i + 2) for i in range(min(k, len(rel))))
        total += dcg / idcg
    return total / len(relevant)


@pytest.fixture(scope='module')
def prepared(synth, tmp_path_factory):
    return prepare(synth, tmp_path_factory.mktemp('prepared'))


@pytest.mark.parametrize('model', ['implicit', 'explicit'])
def test_validation_ndcg_matches_a_naive_loop(prepared, model):
    data = prepared
    settings = TrialSettings(model=model, metric='ndcg', num_iters=3, seed=0)
    params = settings.params({'latent_factors': 6})
    problem = Problem.build(data.train_rows, data.train_cols, data.train_values,
                            data.num_users, data.num_items, params)
    u0, v0 = initial_state(initial_factors(data.user_hashes, 6, 0, 'row'),
                           initial_factors(data.item_hashes, 6, 0, 'col'), params)
    u, v = train(problem, params, u0, v0)
    threshold = 0.0 if model == 'implicit' else problem.global_mean
    got = validation_ndcg(data, problem, u, v, params, threshold)
    want = naive_ndcg(u, v, params, zip(data.train_rows.tolist(), data.train_cols.tolist()),
                      zip(data.val_rows.tolist(), data.val_cols.tolist(),
                          data.val_values.tolist()), threshold)
    assert got == pytest.approx(want, rel=1e-12)
    assert 0 < got < 1


def test_reads_and_writes_gcs(explicit_run, synth, tmp_path):
    """Input and outputs on gs:// (a local Cloud Storage server): the same trials as
    the local run, and no work files left in the bucket."""
    from tests.conftest import ROOT
    from tests.gcs_support import gcs_emulator
    bucket = 'wals-tune-test'
    (tmp_path / 'gcs').mkdir()
    with gcs_emulator(tmp_path / 'gcs', bucket) as emu:
        env = dict(os.environ, PYTHONPATH=str(ROOT), **emu.env())
        put = (f'from apache_beam.io.filesystems import FileSystems as F\n'
               f'with F.create("gs://{bucket}/in/ratings.tsv") as f:\n'
               f'    f.write(open({str(synth)!r}, "rb").read())\n')
        subprocess.run([sys.executable, '-c', put], env=env, check=True, cwd=ROOT)
        out = f'gs://{bucket}/tuning'
        proc = subprocess.run(
            [sys.executable, '-m', 'pipeline.tune', '--input', f'gs://{bucket}/in/*.tsv',
             '--output', out, '--model', 'explicit', '--metric', 'rmse', '--trials', '4',
             '--parallel', '2', '--search_seed', '1', *IN_MEMORY],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert 'trial 4/4' in proc.stderr
        assert sorted(emu.list_objects(bucket, 'tuning/')) == ['tuning/_SUCCESS',
                                                              'tuning/best.json',
                                                              'tuning/trials.csv']
        assert not [n for n in emu.list_objects(bucket) if '.tmp-' in n or '.lease-' in n]
        get = (f'from apache_beam.io.filesystems import FileSystems as F\n'
               f'import sys\n'
               f'sys.stdout.write(F.open("{out}/trials.csv").read().decode())\n')
        table = subprocess.run([sys.executable, '-c', get], env=env, cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout
    local, _ = explicit_run
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(table)).drop(columns='seconds'),
                                  pd.read_csv(local / 'trials.csv').drop(columns='seconds'))

"""Dask as an engine: a real scheduler and two workers on 127.0.0.1; train, recommend
batch and tune run against them, their outputs compared byte for byte with the
DirectRunner's (model files, metrics, recommendation shards, the tuner's trials)."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, _check_unchanged, assert_same_outputs, write_ratings
from tests.test_cli import train_cli

distributed = pytest.importorskip('distributed', reason='the `dask` extra is not installed')

DASK = 'apache_beam.runners.dask.dask_runner.DaskRunner'
MODEL = ('user.npy', 'item.npy', 'row.npy', 'col.npy')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def dask_cluster(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes; yields the scheduler address."""
    logs = tmp_path_factory.mktemp('dask-logs')
    address = f'127.0.0.1:{_free_port()}'
    dask = shutil.which('dask', path=os.path.dirname(sys.executable)) or 'dask'
    # Workers import the pipeline's DoFns from this checkout; one BLAS thread each
    # (two workers share the CI machine's two cores).
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS='1',
               OMP_NUM_THREADS='1')
    commands = [[dask, 'scheduler', '--host', '127.0.0.1', '--port', address.split(':')[1],
                 '--no-dashboard']]
    commands += [[dask, 'worker', f'tcp://{address}', '--host', '127.0.0.1', '--nthreads', '1',
                  '--no-nanny', '--no-dashboard', '--name', f'w{i}'] for i in range(2)]
    procs = []
    try:
        for i, cmd in enumerate(commands):
            with open(logs / f'{i}.log', 'w') as log:
                procs.append(subprocess.Popen(cmd, env=env, cwd=logs, stdout=log,
                                              stderr=subprocess.STDOUT))
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _blocky_ratings(folder: pathlib.Path) -> pathlib.Path:
    """~2500 ratings of 150 users on 100 items, with one bad line: 5 row blocks and
    4 column blocks at --block_size 32."""
    rng = np.random.default_rng(12)
    pairs = rng.choice(150 * 100, size=2500, replace=False)
    path = write_ratings(folder / 'ratings.tsv', pairs // 100 + 1, pairs % 100 + 1,
                         rng.integers(1, 6, size=2500))
    with open(path, 'a') as f:
        f.write('7\tnot-a-number\n')
    return path


@pytest.fixture
def blocky_ratings(tmp_path):
    return _blocky_ratings(tmp_path)


@pytest.fixture(scope='module')
def blocky_ratings_module(tmp_path_factory):
    return _blocky_ratings(tmp_path_factory.mktemp('ratings'))


ARGS = ('--num_iters', '3', '--block_size', '32', '--latent_factors', '4')


@pytest.mark.parametrize('model, exchange, extra', [
    ('wals', 'auto', ()), ('implicit', 'auto', ()), ('explicit', 'auto', ()),
    ('wals', 'routed', ()), ('explicit', 'auto', ('--objective_every', '2'))])
def test_cluster_run_is_byte_identical_to_the_direct_runner(dask_cluster, blocky_ratings,
                                                            tmp_path, model, exchange, extra):
    """Every mode; the Dask side also with the routed exchange (the DirectRunner
    side broadcasts), so both the runner and the exchange are compared; and a
    history with skipped objectives (--objective_every)."""
    direct, dask = tmp_path / 'direct', tmp_path / 'dask'
    args = (*ARGS, '--model', model, *extra)
    train_cli('--input', str(blocky_ratings), '--output', str(direct), *args)
    train_cli('--input', str(blocky_ratings), '--output', str(dask), *args, '--runner', DASK,
              '--dask_client_address', dask_cluster, '--shared_work_dir',
              '--exchange', exchange)
    for name in MODEL:
        assert (dask / 'model' / name).read_bytes() == (direct / 'model' / name).read_bytes(), name
    # Every number of metrics.json, to the last bit (fixed-order sums, docs/determinism.md);
    # only the exchange's own description and the timings may differ.
    d, k = (_metrics_without_timings(p) for p in (direct, dask))
    assert k.pop('exchange')['exchange'] == exchange
    d.pop('exchange')
    for m in (d, k):
        m['parameters'].pop('exchange', None)
    assert k == d
    assert k['lines']['bad'] == 1 and k['history'] and k['ranking_users'] > 0
    bad = sorted((dask / 'errors').glob('bad_lines*.jsonl'))
    assert bad and 'not-a-number' in ''.join(p.read_text() for p in bad)
    assert not list(tmp_path.glob('dask.tmp-*'))   # staging and work folder removed


def _metrics_without_timings(folder: pathlib.Path) -> dict:
    value = json.loads((folder / 'metrics.json').read_text())
    return _check_unchanged()._scrub(value, str(folder))


@pytest.fixture(scope='module')
def explicit_model(blocky_ratings_module, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp('model') / 'explicit'
    train_cli('--input', str(blocky_ratings_module), '--output', str(out), *ARGS,
              '--model', 'explicit')
    return out


@pytest.mark.parametrize('what', [[], ['--similar_items']])
def test_cluster_recommendations_are_byte_identical_to_the_direct_runner(
        dask_cluster, explicit_model, tmp_path, what):
    """`recommend` batch (users' lists, or similar items) on the cluster, through the
    corrected runner: every shard, byte for byte."""
    from pipeline.cli.recommend import main as recommend
    direct, dask = tmp_path / 'direct', tmp_path / 'dask'
    assert recommend(['--model', str(explicit_model), '--output', str(direct), *what]) == 0
    assert recommend(['--model', str(explicit_model), '--output', str(dask), *what,
                      '--runner', DASK, '--dask_client_address', dask_cluster]) == 0
    files = assert_same_outputs(direct, dask)
    assert any(f.startswith(('recommendations-', 'similar_items-')) for f in files), files


def test_cluster_tune_is_identical_to_the_direct_runner(dask_cluster, blocky_ratings_module,
                                                         tmp_path):
    """The tuner's preparation and every batch of trials on the cluster: the same
    trials.csv (but the seconds) and best.json."""
    from pipeline.cli.tune import main as tune
    args = ['--input', str(blocky_ratings_module), '--model', 'explicit', '--metric', 'rmse',
            '--trials', '4', '--parallel', '2', '--num_iters', '3']
    direct, dask = tmp_path / 'direct', tmp_path / 'dask'
    assert tune([*args, '--output', str(direct)]) == 0
    assert tune([*args, '--output', str(dask), '--runner', DASK,
                 '--dask_client_address', dask_cluster]) == 0
    files = assert_same_outputs(direct, dask)
    assert {'trials.csv', 'best.json'} <= set(files)
    best = json.loads((dask / 'best.json').read_text())
    assert best['trials'] == 4 and best['value'] > 0


@pytest.mark.parametrize('flag', ['--dask_client_address', '--dask_scheduler_file'])
def test_remote_runner_refuses_a_local_work_folder(blocky_ratings, tmp_path, flag, capsys):
    from pipeline.cli import train
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as exit_:
        train.main(['--input', str(blocky_ratings), '--output', str(out), *ARGS,
                    '--runner', DASK, flag, '127.0.0.1:9' if 'address' in flag else 'x.json'])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert 'is a local path' in err and '--shared_work_dir' in err
    assert not list(tmp_path.glob('out*'))     # refused before any work


def test_beam_dask_bundles_still_share_one_receiver():
    """Beam's apply_dofn_to_bundle (2.77) returns every output its receiver ever got,
    so a second bundle handed the same receiver re-emits the first one's outputs.
    pipeline/runners/dask_runner.py works around it; when this fails, Beam has fixed it and
    the workaround (and the README note) can go."""
    import apache_beam as beam
    from apache_beam.runners.dask import transform_evaluator as te
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    class Applied:   # what ParDo.apply reads of the AppliedPTransform
        transform = beam.Map(lambda x: x * 10)
        main_inputs = {None: object()}   # no windowing: the global window

    class Bag:       # records the map_partitions call instead of building a graph
        def map(self, *args):
            return self

        def map_partitions(self, fn, *args):
            self.call = fn, args
            return self

    fn, args = te.ParDo(Applied()).apply(Bag()).call
    first, second = (fn([WindowedValue(x, 0, (GlobalWindow(),))], *args) for x in (1, 2))
    assert first == [10]
    assert second == [10, 20], 'Beam no longer re-emits earlier bundles: drop the workaround'

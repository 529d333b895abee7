"""The Dataflow job, built offline: run_dataflow.sh --dry_run, a full job description
(--template_location) staged to a Cloud Storage emulator on 127.0.0.1, and the job
graph size limit."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2

from pipeline.cli import dataflow, train
from pipeline.cli.common import split_beam_args
from pipeline.training import run as training_run
from pipeline.options import ConfigError, config_from_options
from pipeline.store.publish import staging_path
from tests.conftest import ROOT, write_ratings
from tests.gcs_support import PROJECT, gcs_emulator, write_credentials

BUCKET = 'wals-offline-test-bucket'
REGION = 'us-central1'
BASE = ['--project', PROJECT, '--region', REGION, '--bucket', f'gs://{BUCKET}']
PY = f'{sys.version_info.major}.{sys.version_info.minor}'


def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def _loopback_only_env(tmp_path) -> dict:
    """No emulator, but every Google client that might look for a server is pointed
    at a closed loopback port: a dry run must not need one."""
    return dict(os.environ, PYTHONPATH=str(ROOT), NO_GCE_CHECK='true',
                STORAGE_EMULATOR_HOST='http://127.0.0.1:9', GCE_METADATA_HOST='127.0.0.1:9',
                GCE_METADATA_IP='127.0.0.1:9', GOOGLE_CLOUD_PROJECT=PROJECT,
                GOOGLE_APPLICATION_CREDENTIALS=str(write_credentials(tmp_path / 'adc.json')))


def test_run_dataflow_sh_dry_run_builds_the_job_and_says_where_outputs_land(tmp_path):
    proc = subprocess.run(
        [str(ROOT / 'run_dataflow.sh'), *BASE, '--dry_run', '--num_iters', '3',
         '--latent_factors', '8', '--flexrs_goal', 'COST_OPTIMIZED'],
        cwd=tmp_path, env=_loopback_only_env(tmp_path), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    summary = json.loads(out[out.index('\n{') + 1:])
    job = summary['job_name']
    assert job.startswith('wals-')
    output = f'gs://{BUCKET}/models/{job}'
    assert summary['output'] == output
    assert f'{output}/model/' in out and f'{output}/metrics.json' in out
    assert f'{output}/_SUCCESS' in out
    assert 'nothing was submitted' in out
    args = summary['beam_args']
    for expected in (f'--temp_location=gs://{BUCKET}/tmp',
                     f'--staging_location=gs://{BUCKET}/staging',
                     f'--setup_file={ROOT / "setup.py"}', '--runner=DataflowRunner',
                     f'--job_name={job}', f'--machine_type={dataflow.DEFAULT_MACHINE_TYPE}',
                     f'--max_num_workers={dataflow.MAX_WORKERS_UNKNOWN_INPUT}'):
        assert expected in args
    assert '--flexrs_goal' in args and 'COST_OPTIMIZED' in args      # passed through
    assert summary['input'] == f'gs://{BUCKET}/ratings/*'
    assert summary['num_iters'] == 3 and summary['added_experiments'] == []


@pytest.mark.parametrize('argv, message', [
    (['--region', REGION, '--bucket', f'gs://{BUCKET}'], '--project is required'),
    (['--project', PROJECT, '--bucket', f'gs://{BUCKET}'], '--region is required'),
    (['--project', PROJECT, '--region', REGION], '--bucket is required'),
    ([*BASE[:4], '--bucket', BUCKET], '--bucket must be gs://'),
    ([*BASE[:4], '--bucket', '/tmp/bucket'], '--bucket must be gs://'),
    ([*BASE, '--input', 'ratings.tsv'], '--input must be a gs:// path'),
    ([*BASE, '--output', 'out'], '--output must be a gs:// path'),
    ([*BASE, '--runner', 'DirectRunner'], 'runs on Dataflow'),
    ([*BASE, '--job_name', 'Bad_Name'], 'job names'),
    ([*BASE, '--num_itres', '3'], 'unknown option'),
    ([*BASE, '--num_iters', '-1'], '--num_iters must be 0 or more'),
])
def test_launcher_refuses_bad_command_lines(argv, message):
    with pytest.raises(ConfigError, match=message):
        dataflow.plan([*argv, '--dry_run'])


def test_defaults_yield_to_the_options_given():
    p = dataflow.plan([*BASE, '--dry_run', '--job_name', 'nightly-wals',
                       '--machine_type', 'n2-highmem-8', '--max_num_workers', '7',
                       '--temp_location', f'gs://{BUCKET}/scratch', '--num_iters', '2'])
    assert p.config.output == f'gs://{BUCKET}/models/nightly-wals'
    assert (p.machine_type, p.max_num_workers) == ('n2-highmem-8', 7)
    flags = [a.split('=', 1)[0] for a in p.beam_args if a.startswith('--')]
    for flag in ('--job_name', '--machine_type', '--max_num_workers', '--temp_location'):
        assert flags.count(flag) == 1, flag
    assert f'--staging_location=gs://{BUCKET}/staging' in p.beam_args
    # pipeline.cli.train gets the model options, the Beam options and the filled-in paths,
    # and none of the launcher's own flags.
    assert '--num_iters' in p.train_argv
    assert '--bucket' not in p.train_argv and '--dry_run' not in p.train_argv
    parsed, rest = train.build_parser().parse_known_args(p.train_argv)
    assert parsed.output == p.config.output and parsed.num_iters == 2
    assert split_beam_args(rest) == rest


def test_worker_count_follows_the_input_size():
    mib = 1024 * 1024
    assert dataflow.default_max_workers(None) == dataflow.MAX_WORKERS_UNKNOWN_INPUT
    assert dataflow.default_max_workers(2 * mib) == 1
    assert dataflow.default_max_workers(700 * mib) == 3
    assert dataflow.default_max_workers(1 << 40) == dataflow.MAX_WORKERS_CAP


def test_the_dry_run_job_is_the_job_pipeline_train_runs(tmp_path, small_ratings, monkeypatch):
    """The launcher builds dry runs and templates itself (pipeline.training.run.run waits and
    publishes): its graph must stay the one training.run.run submits."""
    captured = []

    class Captured(Exception):
        pass

    def capture(self, *args, **kwargs):
        captured.append(self.to_runner_api())
        raise Captured

    monkeypatch.setattr(beam.Pipeline, 'run', capture)
    options = PipelineOptions(['--input', str(small_ratings), '--output',
                               str(tmp_path / 'out'), '--num_iters', '2'])
    config = config_from_options(options)
    with pytest.raises(Captured):
        training_run.run(config, PipelineOptions([]))
    ours = beam.Pipeline(options=PipelineOptions([]))
    dataflow.build_pipeline(ours, config, staging_path(config.output, 'x'))
    names = lambda p: sorted(t.unique_name for t in p.components.transforms.values())
    assert names(ours.to_runner_api()) == names(captured[0])


def test_graph_size_decides_upload_graph_or_refusal():
    config = dataflow.plan([*BASE, '--dry_run', '--output', f'gs://{BUCKET}/m']).config
    size = dataflow.measure_graph(config)
    assert 10_000 < size.per_iteration_bytes < 1_000_000
    # Linear in the iteration count (each iteration adds the same transforms).
    five = dataflow.graph_bytes(dataflow.dataclasses.replace(
        config, params=dataflow.dataclasses.replace(config.params, num_iters=5)))
    # Close to linear: generated ids grow a digit now and then, and the compressed
    # pickled DoFns vary by some hundred bytes between builds.
    assert abs(five - size.total(5)) <= 0.01 * five
    inline = size.max_iterations(dataflow.GRAPH_LIMIT_BYTES)
    uploaded = size.max_iterations(dataflow.UPLOADED_GRAPH_LIMIT_BYTES)
    assert inline >= 20              # the default --num_iters needs no experiment
    print(f'\njob graph: {size.base_bytes} bytes + {size.per_iteration_bytes} bytes per '
          f'iteration; {inline} iterations fit in 10 MB, {uploaded} with upload_graph')
    # The decision, at the exact boundaries of a fixed size:
    fixed = dataflow.GraphSize(base_bytes=size.base_bytes,
                               per_iteration_bytes=size.per_iteration_bytes)
    assert dataflow.check_graph(fixed, inline, []) == []
    assert dataflow.check_graph(fixed, inline + 1, []) == ['upload_graph']
    assert dataflow.check_graph(fixed, inline + 1, ['upload_graph']) == []
    assert dataflow.check_graph(fixed, uploaded, []) == ['upload_graph']
    with pytest.raises(ConfigError, match=f'Use --num_iters {uploaded} or fewer'):
        dataflow.check_graph(fixed, uploaded + 1, [])
    with pytest.raises(ConfigError, match='needs a gs:// --staging_location'):
        dataflow.check_graph(fixed, inline + 1, [], staging_on_gcs=False)
    # Through the launcher's command line (a new measurement may differ by a few
    # bytes per iteration: ids in the graph are numbered per process, so stay 5%
    # away from the boundaries).
    def launch(num_iters):
        return dataflow.plan([*BASE, '--dry_run', '--output', f'gs://{BUCKET}/m',
                              '--num_iters', str(num_iters)])
    assert launch(int(inline * 0.95)).added_experiments == []
    p = launch(int(inline * 1.05))
    assert p.added_experiments == ['upload_graph']
    assert '--experiments=upload_graph' in p.beam_args
    assert '--experiments=upload_graph' in p.train_argv
    with pytest.raises(ConfigError, match='more than Dataflow accepts'):
        launch(int(uploaded * 1.05))


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
    with gcs_emulator(tmp_path_factory.mktemp('gcs'), BUCKET) as emu:
        yield emu


def _template(emulator, tmp_path, num_iters: int) -> dict:
    path = tmp_path / f'job-{num_iters}.json'
    assert dataflow.launch([*BASE, '--input', f'gs://{BUCKET}/ratings/*.tsv',
                            '--output', f'gs://{BUCKET}/models/t{num_iters}',
                            '--job_name', f'wals-template-{num_iters}',
                            '--num_iters', str(num_iters), '--latent_factors', '8',
                            '--template_location', str(path)]) == 0
    return json.loads(path.read_text())


def _staged_pipeline(job: dict) -> tuple[bytes, beam_runner_api_pb2.Pipeline]:
    url = job['environment']['sdkPipelineOptions']['options']['pipelineUrl']
    data = _read(url)
    return data, beam_runner_api_pb2.Pipeline.FromString(data)


def test_template_job_description(emulator, tmp_path, monkeypatch, capsys):
    ratings = write_ratings(tmp_path / 'r.tsv', range(1, 301), [i % 50 + 1 for i in range(300)],
                            [i % 5 + 1 for i in range(300)]).read_bytes()
    with FileSystems.create(f'gs://{BUCKET}/ratings/r.tsv') as f:
        f.write(ratings)

    one = _template(emulator, tmp_path, 1)
    # Three iterations, with the graph limit lowered so that the launcher must add
    # upload_graph: the steps then go to the staging folder.
    monkeypatch.setattr(dataflow, 'GRAPH_LIMIT_BYTES', 0)
    three = _template(emulator, tmp_path, 3)
    capsys.readouterr()

    for job, n in ((one, 1), (three, 3)):
        env = job['environment']
        pool = env['workerPools'][0]
        options = env['sdkPipelineOptions']['options']
        # The worker package: this checkout's setup.py, built and staged as Beam does.
        packages = {p['name']: p['location'] for p in pool['packages']}
        assert 'workflow.tar.gz' in packages
        staged = 'gs://' + packages['workflow.tar.gz'].split('storage.googleapis.com/', 1)[1]
        assert staged.startswith(f'gs://{BUCKET}/staging/wals-template-{n}.')
        with tarfile.open(fileobj=io.BytesIO(_read(staged))) as tar:
            names = {m.name.split('/', 1)[1] for m in tar.getmembers() if '/' in m.name}
        for module in ('setup.py', 'pipeline/cli/train.py', 'pipeline/cli/dataflow.py',
                       'pipeline/training/graph.py', 'wals_core/solve.py', 'wals_core/__init__.py'):
            assert module in names
        assert options['setup_file'] == str(ROOT / 'setup.py')
        # Runner v2 on the SDK container of this Python and Beam version.
        for experiment in ('use_runner_v2', 'beam_fn_api', 'use_portable_job_submission'):
            assert experiment in env['experiments']
        images = [c['containerImage'] for c in pool['sdkHarnessContainerImages']]
        assert images and all(i.endswith(f'beam_python{PY}_sdk:{beam.__version__}')
                              for i in images)
        # Defaults: job name, temp/staging under the bucket, machine, workers.
        assert job['name'] == f'wals-template-{n}'
        assert options['temp_location'].startswith(f'gs://{BUCKET}/tmp/')
        assert options['staging_location'].startswith(f'gs://{BUCKET}/staging/')
        assert pool['machineType'] == dataflow.DEFAULT_MACHINE_TYPE
        assert pool['autoscalingSettings']['maxNumWorkers'] == 1     # a tiny input
        # Side inputs: each half-step's solve gets the other side's factors, the
        # column counts and the training-rating summary (the explicit mode's mean);
        # the evaluation and the writer get theirs too.
        _, pipeline = _staged_pipeline(job)
        side = {}
        for t in pipeline.components.transforms.values():
            if t.spec.urn == 'beam:transform:pardo:v1':
                payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
                if payload.side_inputs:
                    side[t.unique_name] = len(payload.side_inputs)
        solves = {k: v for k, v in side.items() if k.endswith('/Solve')}
        assert len(solves) == 2 * n and set(solves.values()) == {3}
        assert any(k.endswith('Evaluate/BlockErrors') and v == 4 for k, v in side.items())
        # 16 since the trained model's sanity check joined the writer (issue 18)
        assert any(k.endswith('WriteModel/Write') and v == 16 for k, v in side.items())

    assert 'upload_graph' not in one['environment']['experiments']
    assert 'stepsLocation' not in one
    assert 'upload_graph' in three['environment']['experiments']
    steps = three['stepsLocation']
    assert steps.endswith('/dataflow_graph.json') and json.loads(_read(steps))['name']

    # Graph bytes per iteration, measured on the staged pipelines.
    size1, size3 = len(_staged_pipeline(one)[0]), len(_staged_pipeline(three)[0])
    per_iteration = (size3 - size1) // 2
    base = size1 - per_iteration
    fits = (10 * 1024 * 1024 - base) // per_iteration
    print(f'\nstaged job graph: {base} bytes + {per_iteration} bytes per iteration')
    # The launcher's estimate (the JSON form) is on the safe side, but not by 2x.
    estimate = dataflow.measure_graph(dataflow.plan(
        [*BASE, '--dry_run', '--num_iters', '3', '--latent_factors', '8',
         '--output', f'gs://{BUCKET}/models/t3']).config)
    assert per_iteration <= estimate.per_iteration_bytes <= 2 * per_iteration
    assert fits >= 20

"""The Cloud Composer retraining DAG (deploy/airflow/) in a real Airflow.

Airflow lives in its own venv, deploy/airflow/.venv (built by deploy/airflow/setup_env.sh
on first use, a few minutes, then cached by the hash of its requirements files); it is
never a dependency of the project. deploy/airflow/check_dag.py loads the DAG in a
DagBag there, plans a run on real dump files, executes the train operator on a stand-in
pipeline file and runs the report task on a real model root, and prints JSON that the
tests below check. The launcher file itself runs in the project's venv.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / 'deploy' / 'airflow'
VENV_PYTHON = DEPLOY / '.venv' / 'bin' / 'python'


@pytest.fixture(scope='module')
def check(tmp_path_factory) -> dict:
    subprocess.run([str(DEPLOY / 'setup_env.sh')], check=True)
    work = tmp_path_factory.mktemp('airflow')
    proc = subprocess.run([str(VENV_PYTHON), str(DEPLOY / 'check_dag.py'), str(work)],
                          capture_output=True, text=True, timeout=600, cwd=work)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('CHECK_DAG_JSON ')]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1].split(' ', 1)[1])
    assert 'crash' not in out, out.get('crash')
    return out


def test_dagbag_imports_the_dag_without_errors(check):
    assert check['import_errors'] == {}
    assert check['dag_ids'] == ['wals_retrain']   # launcher and checker are ignored


def test_task_graph_schedule_and_catchup(check):
    g = check['graph']
    assert g['task_ids'] == ['find_newest_dump', 'report', 'train']
    assert g['downstream'] == {'find_newest_dump': ['train'], 'train': ['report'],
                               'report': []}
    assert g['schedule'] == '@daily'
    assert g['catchup'] is False
    assert g['max_active_runs'] == 1
    assert g['params'] == sorted(['dumps_prefix', 'model_root', 'project', 'region',
                                  'temp_location', 'max_regression', 'code_dir',
                                  'trainer_args'])


def test_train_is_the_beam_providers_python_operator_on_dataflow(check):
    g = check['graph']
    assert g['train_operator_mro'][1] == 'BeamRunPythonPipelineOperator'
    assert g['train_runner'] == 'DataflowRunner'
    assert g['train_py_file'] == str(DEPLOY / 'wals_train_launcher.py')
    assert {'pipeline_options', 'dataflow_config'} <= set(g['train_template_fields'])


def test_newest_dump_is_the_last_written_and_markers_are_skipped(check):
    # ratings-20260105.tsv has the larger name but was written first; the folder's
    # _SUCCESS and the hidden .partial/ folder are newer still but are not dumps.
    assert check['plan']['input'].endswith('/dumps/2026-01-03/*')
    assert check['no_dump'] == 'AirflowSkipException'
    assert 'wals_dumps_prefix, wals_model_root, wals_project' in check['missing_settings']
    assert check['default_temp'] == 'gs://mb/tmp'


def test_first_version_has_no_previous_model(check):
    # No ROOT/LATEST yet: the trainer would refuse --previous_model ROOT.
    first, later = check['plan_first_version'], check['plan']
    assert 'previous_model' not in first['pipeline_options']
    assert later['pipeline_options']['previous_model'] == later['model_root']
    assert first['pipeline_options']['model_root'].endswith('/empty_root')


def test_the_command_line_the_operator_runs(check):
    dump, root = check['plan']['input'], check['plan']['model_root']
    assert not root.endswith('/')
    for code in ('0', '3', '1'):
        run = check['train'][code]
        # The train task's templated fields render from find_newest_dump's XCom.
        assert run['rendered']['dataflow_config'] == {
            'job_name': 'wals-retrain', 'append_job_name': True, 'project_id': 'proj',
            'location': 'europe-west1'}
        argv = run['argv']
        job = [a for a in argv if a.startswith('--job_name=')]
        assert len(job) == 1 and re.fullmatch(r'--job_name=wals-retrain-[0-9a-f]{8}', job[0])
        labels = [a for a in argv if a.startswith('--labels=')]
        assert len(labels) == 1 and labels[0].startswith('--labels=airflow-version=v3-')
        assert [a for a in argv if a not in job + labels] == [
            '--runner=DataflowRunner',
            '--project=proj',
            '--region=europe-west1',
            f'--input={dump}',
            f'--model_root={root}',
            f'--previous_model={root}',
            '--max_regression=0.02',
            '--temp_location=gs://b/tmp',
            '--staging_location=gs://b/tmp/staging',
            '--setup_file=/dags/wals/setup.py',
            # trainer_args from the Airflow Variable wals_trainer_args
            '--model=implicit', '--num_iters=15', '--latent_factors=32',
        ]


def test_exit_code_3_is_kept_not_failed_and_other_codes_fail(check):
    ok, kept, failed = (check['train'][c] for c in ('0', '3', '1'))
    assert ok['result'] == {'dataflow_job_id': '2026-01-02_03_04_05-123', 'exit_code': 0,
                            'version': '20260102T030405Z-abcd'}
    assert kept['result']['exit_code'] == 3 and 'error' not in kept
    assert 'return code 1' in failed['error'] and 'result' not in failed
    # The job id was seen (console link) although the operator read on to the end.
    for run in (ok, kept, failed):
        assert run['xcom_pushed']['dataflow_job_id'] == '2026-01-02_03_04_05-123'


def test_report_reads_latest_and_the_versions_report(check):
    kept, promoted, fallback = (check['report'][k]
                                for k in ('kept', 'promoted', 'no_version_line'))
    assert (kept['promoted'], kept['latest'], kept['version']) == (False, 'v1', 'v2')
    assert kept['gate_reason'] == 'reason v2' and kept['exit_code'] == 3
    assert (promoted['promoted'], promoted['version']) == (True, 'v1')
    assert promoted['iterations_run'] == 5
    # Without the launcher's "Model written to" line: the newest version.
    assert fallback['version'] == 'v2'


def _launch(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    return subprocess.run([sys.executable, str(DEPLOY / 'wals_train_launcher.py'), *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_launcher_runs_pipeline_train_of_the_setup_file_folder(tmp_path):
    proc = _launch([f'--setup_file={ROOT}/setup.py', '--help'], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 'usage: python -m pipeline.train' in proc.stdout and '--model_root' in proc.stdout
    missing = _launch(['--help'], tmp_path)
    assert missing.returncode == 1 and '--setup_file' in missing.stderr


def test_launcher_passes_the_trainers_exit_code_through(tmp_path):
    # A stand-in project next to its setup.py: the launcher must import this one.
    project = tmp_path / 'wals'
    (project / 'pipeline').mkdir(parents=True)
    (project / 'setup.py').write_text('')
    (project / 'pipeline' / '__init__.py').write_text('')
    (project / 'pipeline' / 'train.py').write_text(
        'def main(argv):\n    print("stand-in", argv)\n    return 3\n')
    proc = _launch(['--setup_file', str(project / 'setup.py'), '--input=x'], tmp_path)
    assert proc.returncode == 3, proc.stderr
    argv = ['--setup_file', f'{project}/setup.py', '--input=x']
    assert proc.stdout.strip() == f'stand-in {argv}'

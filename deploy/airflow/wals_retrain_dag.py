"""Daily WALS retraining on Cloud Composer (Airflow 2.11+ or 3.x).

    find_newest_dump >> train >> report

find_newest_dump  picks the newest ratings dump under the dumps prefix (a file, or a
                  folder of files, directly under it; newest = last written) and plans
                  the trainer's options for it (XCom).
train             runs `python -m pipeline.train` on Dataflow through the Apache Beam
                  provider's BeamRunPythonPipelineOperator (file wals_train_launcher.py)
                  with --model_root ROOT --previous_model ROOT --max_regression X: it
                  warm starts from ROOT/LATEST, gates the new model against it and moves
                  LATEST only when the gate passes. Exit code 3 (the gate kept the
                  previous model) is a successful run, not a crash.
report            reads ROOT/LATEST and the new version's report.json and logs the
                  summary: promoted or kept, why, and what changed.

Settings: Airflow Variables wals_<name>, overridden per run by the DAG run's conf
(params <name>): dumps_prefix, model_root and project are required; region,
temp_location, max_regression, code_dir and trainer_args have defaults (DEFAULTS).
See the README, "The daily loop on Cloud Composer".
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shlex

from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.providers.common.compat.sdk import (DAG, AirflowException, AirflowSkipException,
                                                 Param, Variable)
try:
    from airflow.providers.standard.operators.python import PythonOperator
except ImportError:   # Airflow 2 without the standard provider
    from airflow.operators.python import PythonOperator

log = logging.getLogger(__name__)

DAG_ID = 'wals_retrain'
HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = os.path.join(HERE, 'wals_train_launcher.py')
EXIT_GATE = 3          # pipeline.cli.train: the gate kept the previous model
VARIABLE_PREFIX = 'wals_'
REQUIRED = ('dumps_prefix', 'model_root', 'project')
DEFAULTS = {
    'region': 'us-central1',
    'temp_location': None,            # default: gs://<model_root's bucket>/tmp
    'max_regression': '0.02',
    'code_dir': os.path.join(HERE, 'wals'),   # the project: setup.py, pipeline/, wals_core/
    'trainer_args': '',               # more trainer options, e.g. "--model implicit"
}
SETTINGS = REQUIRED + tuple(DEFAULTS)


# ---- pure helpers (the test calls them) ------------------------------------------

def resolve_settings(params: dict, variable_get) -> dict:
    """Each setting from the run's params, else the Airflow Variable wals_<name>, else
    DEFAULTS. variable_get(key, default) is Variable.get."""
    out = {}
    for name in SETTINGS:
        value = params.get(name)
        if value in (None, ''):
            value = variable_get(VARIABLE_PREFIX + name, DEFAULTS.get(name))
        out[name] = value
    missing = [VARIABLE_PREFIX + n for n in REQUIRED if not out[n]]
    if missing:
        raise AirflowException(f'set the Airflow Variable(s) {", ".join(missing)} (or pass '
                               'them in the DAG run conf without the prefix)')
    if not out['temp_location']:
        out['temp_location'] = re.sub(r'^(gs://[^/]+).*$', r'\1', out['model_root']) + '/tmp'
    return out


def newest_dump(objects: list[tuple[str, float]], prefix: str) -> str | None:
    """The input pattern of the newest dump among (path, updated) objects under prefix:
    PREFIX/NAME for a file directly under it, PREFIX/NAME/* for a folder (its update time
    is its newest file's). Names starting with '_' or '.' (markers) are not dumps.
    Newest = last written; ties go to the larger name."""
    base = prefix.rstrip('/') + '/'
    dumps: dict[str, tuple[float, str]] = {}
    for path, updated in objects:
        if not path.startswith(base) or path.endswith('/'):
            continue
        parts = path[len(base):].split('/')
        if any(p.startswith(('_', '.')) for p in parts):
            continue
        pattern = base + parts[0] + ('/*' if len(parts) > 1 else '')
        dumps[pattern] = max(dumps.get(pattern, (updated, pattern)), (updated, pattern))
    if not dumps:
        return None
    return max(dumps.values())[1]


def trainer_options(args: str) -> dict:
    """A trainer command line ("--model implicit --num_iters=15 --flag") as the Beam
    operator's options dict (it turns {k: v} back into --k=v, True into --k)."""
    out: dict = {}
    tokens = shlex.split(args or '')
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith('--'):
            raise AirflowException(f'trainer_args: expected --option, got {token!r}')
        key, eq, value = token[2:].partition('=')
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith('--'):
                value, i = tokens[i + 1], i + 1
            else:
                value = True
        out[key] = value if key not in out else [*_as_list(out[key]), value]
        i += 1
    return out


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def plan_run(settings: dict, dump: str, has_latest: bool) -> dict:
    """What the train task runs for a dump: the trainer's options (the operator adds
    --runner, --project, --region, --job_name and --labels from the Dataflow
    configuration) and that configuration. --previous_model ROOT only once ROOT has a
    LATEST: the trainer refuses a --previous_model that names no model, and the
    root's first version has nothing to start from or be gated against."""
    root = settings['model_root'].rstrip('/')
    temp = settings['temp_location'].rstrip('/')
    options = {
        'input': dump,
        'model_root': root,
        # warm start from ROOT/LATEST and gate against it
        **({'previous_model': root} if has_latest else {}),
        'max_regression': str(settings['max_regression']),
        'temp_location': temp,
        'staging_location': f'{temp}/staging',
        'setup_file': os.path.join(settings['code_dir'], 'setup.py'),
    }
    options.update(trainer_options(settings['trainer_args']))
    return {
        'input': dump,
        'pipeline_options': options,
        'dataflow_config': {'job_name': 'wals-retrain', 'append_job_name': True,
                            'project_id': settings['project'],
                            'location': settings['region']},
    }


def beam_exit_code(error: Exception) -> int | None:
    """The launcher's exit code in the Beam hook's "...failed with return code N"."""
    match = re.search(r'return code (-?\d+)\s*$', str(error))
    return int(match.group(1)) if match else None


def summarize(latest: dict | None, report: dict | None, version: str | None,
              exit_code: int | None) -> dict:
    """The report task's summary of a run (logged, and returned as its XCom)."""
    gate = (report or {}).get('gate') or {}
    promoted = latest is not None and version is not None and latest.get('version') == version
    return {
        'version': version, 'latest': (latest or {}).get('version'),
        'promoted': promoted, 'exit_code': exit_code,
        'gate_reason': gate.get('reason'),
        'metrics': (report or {}).get('metrics'),
        'changes': (report or {}).get('changes'),
        'iterations_run': (report or {}).get('iterations_run'),
        'seconds': (report or {}).get('seconds'),
    }


# ---- storage: gs:// through the Google provider's GCSHook, else the local disk ----

def _split_gcs(url: str) -> tuple[str, str]:
    bucket, _, name = url[len('gs://'):].partition('/')
    return bucket, name


def list_objects(prefix: str) -> list[tuple[str, float]]:
    """(path, update time as a POSIX timestamp) of every object under prefix."""
    if prefix.startswith('gs://'):
        from airflow.providers.google.cloud.hooks.gcs import GCSHook
        bucket, name = _split_gcs(prefix.rstrip('/') + '/')
        blobs = GCSHook().get_conn().bucket(bucket).list_blobs(prefix=name)
        return [(f'gs://{bucket}/{b.name}', b.updated.timestamp()) for b in blobs]
    out = []
    for folder, _, files in os.walk(prefix):
        for f in files:
            path = os.path.join(folder, f)
            out.append((path, os.path.getmtime(path)))
    return out


def read_text(url: str) -> str | None:
    """A small file's text, None if it does not exist."""
    if url.startswith('gs://'):
        from airflow.providers.google.cloud.hooks.gcs import GCSHook
        bucket, name = _split_gcs(url)
        hook = GCSHook()
        return hook.download(bucket, name).decode() if hook.exists(bucket, name) else None
    try:
        with open(url, encoding='utf-8') as f:
            return f.read()
    except FileNotFoundError:
        return None


def list_versions(root: str) -> list[str]:
    """Version names under ROOT/versions/ that have a report.json, oldest first (the
    names sort by time)."""
    base = root.rstrip('/') + '/versions/'
    names = {p[len(base):].split('/')[0] for p, _ in list_objects(base)
             if p.endswith('/report.json')}
    return sorted(names)


# ---- the tasks --------------------------------------------------------------------

def find_newest_dump(params: dict, **_) -> dict:
    settings = resolve_settings(params, Variable.get)
    dump = newest_dump(list_objects(settings['dumps_prefix']), settings['dumps_prefix'])
    if dump is None:
        raise AirflowSkipException(f'no dump under {settings["dumps_prefix"]}')
    root = settings['model_root'].rstrip('/')
    has_latest = read_text(f'{root}/LATEST') is not None
    log.info('Newest dump: %s; %s', dump, f'previous model: {root}/LATEST' if has_latest
             else f'no {root}/LATEST yet: the first version (cold start, no gate)')
    return dict(plan_run(settings, dump, has_latest), model_root=root)


class WalsTrainOperator(BeamRunPythonPipelineOperator):
    """The Beam operator for pipeline.cli.train on Dataflow, with two changes:

    - It waits for the launcher process to exit. The stock operator stops reading the
      process once it has seen the Dataflow job id and then waits for the job through
      the Dataflow API; but pipeline.cli.train publishes the model, moves LATEST and writes
      report.json in the launcher after the job, so the launcher must finish and its
      exit code decides.
    - Exit code 3 (the gate kept the previous model) succeeds, with a log line; any
      other non-zero code fails the task as usual.
    Returns {'dataflow_job_id', 'exit_code', 'version'} (XCom), version being the
    folder the launcher says it published.
    """

    PUBLISHED = re.compile(r'Model written to (\S+?)/model/')

    def execute_on_dataflow(self, context):
        published: list[str] = []
        find_job_id = self.process_line_callback

        def on_line(line: str) -> None:
            find_job_id(line)
            match = self.PUBLISHED.search(line)
            if match:
                published.append(match.group(1))

        exit_code = 0
        try:
            self.beam_hook.start_python_pipeline(
                variables=self.snake_case_pipeline_options, py_file=self.py_file,
                py_options=self.py_options, py_interpreter=self.py_interpreter,
                py_requirements=self.py_requirements,
                py_system_site_packages=self.py_system_site_packages,
                process_line_callback=on_line)   # no job-id early return: wait to the end
        except AirflowException as e:
            exit_code = beam_exit_code(e)
            if exit_code != EXIT_GATE:
                raise
            self.log.warning('The gate kept the previous model (exit code 3): the new '
                             'version is published but LATEST did not move. Not a failure.')
        if self.dataflow_job_id:
            from airflow.providers.google.cloud.links.dataflow import DataflowJobLink
            DataflowJobLink.persist(context=context, region=self.dataflow_config.location,
                                    job_id=self.dataflow_job_id,
                                    project_id=self.dataflow_config.project_id)
        version = published[-1].rstrip('/').rsplit('/', 1)[-1] if published else None
        return {'dataflow_job_id': self.dataflow_job_id, 'exit_code': exit_code,
                'version': version}


def report(ti, **_) -> dict:
    plan = ti.xcom_pull(task_ids='find_newest_dump')
    train = ti.xcom_pull(task_ids='train') or {}
    root = plan['model_root']
    latest_text = read_text(f'{root}/LATEST')
    latest = json.loads(latest_text) if latest_text else None
    version = train.get('version') or (list_versions(root) or [None])[-1]
    text = read_text(f'{root}/versions/{version}/report.json') if version else None
    summary = summarize(latest, json.loads(text) if text else None, version,
                        train.get('exit_code'))
    if summary['promoted']:
        log.info('Promoted %s: LATEST now names it. %s', version, summary['gate_reason'])
    else:
        log.warning('Kept the previous model: LATEST names %s, not %s. %s',
                    summary['latest'], version, summary['gate_reason'])
    log.info('Run summary: %s', json.dumps(summary, indent=1, sort_keys=True))
    return summary


def _train_field(key: str) -> str:
    return "{{ ti.xcom_pull(task_ids='find_newest_dump')['%s'] }}" % key


with DAG(
    dag_id=DAG_ID,
    description='Daily WALS retraining on Dataflow: newest dump, warm start, gated promotion',
    schedule='@daily',
    start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    catchup=False,
    max_active_runs=1,                  # one run moves LATEST at a time
    render_template_as_native_obj=True,  # the train task's options render as dicts
    default_args={'retries': 0},
    params={name: Param(None, type=['null', 'string'],
                        description=f'overrides the Variable {VARIABLE_PREFIX}{name}')
            for name in SETTINGS},
    tags=['wals'],
) as dag:
    find = PythonOperator(task_id='find_newest_dump', python_callable=find_newest_dump)
    train = WalsTrainOperator(
        task_id='train',
        py_file=LAUNCHER,
        runner='DataflowRunner',
        pipeline_options=_train_field('pipeline_options'),
        dataflow_config=_train_field('dataflow_config'),
        execution_timeout=datetime.timedelta(hours=6),
    )
    summary = PythonOperator(task_id='report', python_callable=report)
    find >> train >> summary

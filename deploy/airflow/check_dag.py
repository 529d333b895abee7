"""Loads the retraining DAG in a real Airflow DagBag and prints what it found as JSON.

Run with deploy/airflow/.venv/bin/python (tests/test_airflow_dag.py does, and asserts
on the JSON). It sets AIRFLOW_HOME to a temporary folder and touches no database and
no network: the train task is executed with a stand-in pipeline file that records
the command line the Beam operator built and exits with a chosen code.
Usage: check_dag.py WORK_DIR
"""
from __future__ import annotations

import copy
import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.abspath(sys.argv[1])
os.makedirs(WORK, exist_ok=True)
os.environ.update({
    'AIRFLOW_HOME': os.path.join(WORK, 'airflow_home'),
    'AIRFLOW__CORE__LOAD_EXAMPLES': 'False',
    'AIRFLOW__CORE__DAGS_FOLDER': HERE,
    'AIRFLOW__CORE__UNIT_TEST_MODE': 'True',
    # DataflowHook reads its connection when the task starts; no credentials are used.
    'AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT': 'google-cloud-platform://',
    # One setting from an Airflow Variable (the others come from the run's params).
    'AIRFLOW_VAR_WALS_TRAINER_ARGS': '--model implicit --num_iters=15 --latent_factors 32',
})

try:   # the file-parsing DagBag (Airflow 3); Airflow 2 has it in airflow.models
    from airflow.dag_processing.dagbag import DagBag  # noqa: E402 - after the environment
except ImportError:
    from airflow.models.dagbag import DagBag  # noqa: E402

STUB = '''\
import json, sys
print("INFO Created job with id: [2026-01-02_03_04_05-123]", file=sys.stderr, flush=True)
print("INFO more output after the job id: the operator must keep reading", flush=True)
json.dump(sys.argv, open({argv_file!r}, "w"))
print("Model written to /root/versions/20260102T030405Z-abcd/model/ (metrics: ...)")
sys.exit({code})
'''


class FakeTI:
    """The task instance methods the tasks call: XCom in a dict (a copy per pull, as
    Airflow deserializes one)."""

    def __init__(self, xcoms: dict):
        self.xcoms, self.pushed = dict(xcoms), {}

    def xcom_pull(self, task_ids=None, key='return_value', **_):
        return copy.deepcopy(self.xcoms.get(task_ids)) if key == 'return_value' else None

    def xcom_push(self, key, value, **_):
        self.pushed[key] = value


def graph(dag) -> dict:
    return {
        'dag_id': dag.dag_id,
        'task_ids': sorted(dag.task_ids),
        'downstream': {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks},
        'schedule': str(getattr(dag, 'schedule', None) or dag.timetable.summary),
        'timetable': type(dag.timetable).__name__,
        'catchup': dag.catchup,
        'max_active_runs': dag.max_active_runs,
        'params': sorted(dag.params.keys()),
        'train_operator_mro': [c.__name__ for c in type(dag.get_task('train')).__mro__][:3],
        'train_runner': dag.get_task('train').runner,
        'train_py_file': dag.get_task('train').py_file,
        'train_template_fields': list(dag.get_task('train').template_fields),
    }


def run_train(task, plan: dict, code: int) -> dict:
    """Executes the train operator (rendered from the plan's XCom) with a stub file."""
    op = copy.deepcopy(task)
    ti = FakeTI({'find_newest_dump': plan})
    context = {'ti': ti, 'task': op, 'params': {}}
    op.render_template_fields(context)
    rendered = {'pipeline_options': copy.deepcopy(op.pipeline_options),
                'dataflow_config': copy.deepcopy(op.dataflow_config)}
    argv_file = os.path.join(WORK, f'argv-{code}.json')
    stub = os.path.join(WORK, f'stub_{code}.py')
    with open(stub, 'w') as f:
        f.write(STUB.format(argv_file=argv_file, code=code))
    op.py_file, op.py_interpreter = stub, sys.executable
    out = {'rendered': rendered}
    try:
        out['result'] = op.execute(context)
    except Exception as e:   # noqa: BLE001 - reported to the test
        out['error'] = f'{type(e).__name__}: {e}'
    with open(argv_file) as f:
        out['argv'] = json.load(f)[1:]
    out['xcom_pushed'] = ti.pushed
    return out


def write(path: str, text: str, mtime: float | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def main() -> dict:
    bag = DagBag(dag_folder=HERE)   # examples are off (AIRFLOW__CORE__LOAD_EXAMPLES)
    result = {'import_errors': {k: str(v) for k, v in bag.import_errors.items()},
              'dag_ids': sorted(bag.dag_ids)}
    dag = bag.dags.get('wals_retrain')   # get_dag() would ask the database
    if dag is None:
        return result
    result['graph'] = graph(dag)

    sys.path.insert(0, HERE)
    import wals_retrain_dag as m

    # A real (local) model root: v2 was refused, LATEST still names v1.
    root = os.path.join(WORK, 'root')
    write(f'{root}/LATEST', json.dumps({'version': 'v1', 'path': f'{root}/versions/v1'}))
    for v, passed in (('v1', True), ('v2', False)):
        write(f'{root}/versions/{v}/report.json', json.dumps({
            'version': v, 'iterations_run': 5, 'metrics': {'test_rmse': 1.0},
            'gate': {'passed': passed, 'reason': f'reason {v}'}, 'changes': None}))

    # find_newest_dump on real files: a dated folder written last wins over a newer
    # name written earlier; markers and hidden files are not dumps.
    dumps = os.path.join(WORK, 'dumps')
    write(f'{dumps}/ratings-20260105.tsv', 'u\ti\t1\n', mtime=1_000)
    write(f'{dumps}/2026-01-03/part-0.tsv', 'u\ti\t1\n', mtime=2_000)
    write(f'{dumps}/2026-01-03/part-1.tsv', 'u\ti\t1\n', mtime=3_000)
    write(f'{dumps}/2026-01-03/_SUCCESS', '', mtime=9_000)
    write(f'{dumps}/.partial/part-0.tsv', '', mtime=9_000)
    params = {'dumps_prefix': dumps, 'model_root': root + '/', 'project': 'proj',
              'region': 'europe-west1', 'temp_location': 'gs://b/tmp',
              'code_dir': '/dags/wals'}
    plan = m.find_newest_dump(params=params)
    result['plan'] = plan
    result['plan_first_version'] = m.find_newest_dump(
        params=dict(params, model_root=os.path.join(WORK, 'empty_root')))
    try:
        m.find_newest_dump(params=dict(params, dumps_prefix=os.path.join(WORK, 'none')))
        result['no_dump'] = 'no exception'
    except Exception as e:   # noqa: BLE001
        result['no_dump'] = type(e).__name__
    try:
        m.resolve_settings({}, lambda key, default: default)
        result['missing_settings'] = 'no exception'
    except Exception as e:   # noqa: BLE001
        result['missing_settings'] = str(e)
    result['default_temp'] = m.resolve_settings(
        {'dumps_prefix': 'gs://d/x', 'model_root': 'gs://mb/models/wals', 'project': 'p'},
        lambda key, default: default)['temp_location']

    train = dag.get_task('train')
    result['train'] = {str(code): run_train(train, plan, code) for code in (0, 3, 1)}

    runs = {}
    for name, train_xcom in (('kept', {'exit_code': 3, 'version': 'v2'}),
                             ('promoted', {'exit_code': 0, 'version': 'v1'}),
                             ('no_version_line', {'exit_code': 3, 'version': None})):
        ti = FakeTI({'find_newest_dump': dict(plan, model_root=root), 'train': train_xcom})
        runs[name] = m.report(ti=ti)
    result['report'] = runs
    return result


if __name__ == '__main__':
    try:
        out = main()
    except Exception:   # noqa: BLE001 - the test shows it
        out = {'crash': traceback.format_exc()}
    print('CHECK_DAG_JSON ' + json.dumps(out, default=str))

"""Dask against the DirectRunner on the synthetic 1m set (issue 12: Dask ≤ 3× in_memory).

In one run: makes the ml-1m synthetic preset (seed 0; cached in output/bench-dask/,
which git ignores), trains it with `python -m pipeline.train ... --num_iters 10` on
the DirectRunner (`--direct_running_mode in_memory`) and then on a Dask cluster of a
`dask scheduler` and two `dask worker` processes (1 thread each,
OPENBLAS_NUM_THREADS=1) started on 127.0.0.1 by this script, with the same trainer
flags otherwise. Compares the model files byte for byte, prints a table and writes
it as the "dask" section of BENCHMARKS.md. When Dask takes more than 3× the
DirectRunner, the section also says where its time goes, measured on the cluster
during the run: the scheduler's task stream (compute, transfer and deserialization
per task, per Beam stage), its update-graph events (graph submissions), the
workers' fine performance metrics and incoming-transfer logs (bytes moved).

    python bench/bench_dask.py                    # 1m, 10 iterations
    python bench/bench_dask.py --num_iters 3 --preset sample   # a quick check

Only one benchmark should run at a time (a 2-core machine); the load average at the
start and the end is in the section.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))
from run_bench import write_section  # noqa: E402

DASK_RUNNER = 'apache_beam.runners.dask.dask_runner.DaskRunner'
CACHE = ROOT / 'output' / 'bench-dask'
TARGET = 3.0


# ---------------------------------------------------------------------------------
# Data, runs, cluster
# ---------------------------------------------------------------------------------

def data_file(preset: str) -> pathlib.Path:
    from pipeline.io.synth import ensure_sample
    return pathlib.Path(ensure_sample(str(CACHE / f'{preset}.data'), preset, seed=0))


def train(args: list[str], out: pathlib.Path, log: pathlib.Path) -> dict:
    """Runs the trainer CLI; returns its wall seconds (spawn to exit) and metrics."""
    cmd = [sys.executable, '-m', 'pipeline.train', '--output', str(out), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED='1')
    with open(log, 'w') as f:
        f.write(' '.join(cmd) + '\n')
        f.flush()
        started = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        ended = time.time()
    if proc.returncode != 0:
        raise SystemExit(f'{" ".join(cmd)} failed (exit {proc.returncode}); see {log}')
    return {'command': cmd, 'wall': ended - started, 'started': started, 'ended': ended,
            'metrics': json.loads((out / 'metrics.json').read_text())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Cluster:
    """`dask scheduler` + N `dask worker` processes on 127.0.0.1 (as tests/test_dask.py)."""

    def __init__(self, logs: pathlib.Path, workers: int = 2):
        self.address = f'127.0.0.1:{_free_port()}'
        dask = shutil.which('dask', path=os.path.dirname(sys.executable)) or 'dask'
        env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS='1',
                   OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
        cmds = [[dask, 'scheduler', '--host', '127.0.0.1', '--port',
                 self.address.split(':')[1], '--no-dashboard']]
        cmds += [[dask, 'worker', f'tcp://{self.address}', '--host', '127.0.0.1',
                  '--nthreads', '1', '--no-nanny', '--no-dashboard', '--name', f'w{i}']
                 for i in range(workers)]
        self.procs = []
        for i, cmd in enumerate(cmds):
            with open(logs / f'dask-{"scheduler" if i == 0 else f"worker{i - 1}"}.log',
                      'w') as log:
                self.procs.append(subprocess.Popen(cmd, env=env, cwd=logs, stdout=log,
                                                   stderr=subprocess.STDOUT))
        import distributed
        self.client = distributed.Client(self.address, timeout=60)
        self.client.wait_for_workers(workers, timeout=120)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            for p in reversed(self.procs):
                p.terminate()
            for p in self.procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()


# ---------------------------------------------------------------------------------
# What the cluster saw
# ---------------------------------------------------------------------------------

def _metrics_snapshot(dask_scheduler):
    return [[list(k) if isinstance(k, tuple) else k, v]
            for k, v in dask_scheduler.cumulative_worker_metrics.items()]


def before_run(client) -> dict:
    """Installs the scheduler's task stream and takes the cursors to diff against."""
    return {'task_index': client.run_on_scheduler(
                lambda dask_scheduler: dask_scheduler.get_task_stream_index()),
            'metrics': client.run_on_scheduler(_metrics_snapshot),
            'transfers': {w: len(v) for w, v in client.run(
                lambda dask_worker: list(dask_worker.transfer_incoming_log)).items()}}


def after_run(client, cursor: dict) -> dict:
    time.sleep(3)      # workers send their metrics with the heartbeat
    index = cursor['task_index']
    tasks = client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.get_task_stream(start_index=index))
    events = [e for _, e in client.get_events('scheduler')
              if isinstance(e, dict) and e.get('action') == 'update-graph']
    old = {tuple(k) if isinstance(k, list) else k: v for k, v in cursor['metrics']}
    fine = {}
    for k, v in client.run_on_scheduler(_metrics_snapshot):
        k = tuple(k) if isinstance(k, list) else k
        if v - old.get(k, 0):
            fine[k] = v - old.get(k, 0)
    transfers = []
    for w, log in client.run(lambda dask_worker: list(dask_worker.transfer_incoming_log)).items():
        transfers += log[cursor['transfers'].get(w, 0):]
    return {'tasks': tasks, 'graphs': events, 'fine': fine, 'transfers': transfers}


_HEX = re.compile(r'-[0-9a-f]{8,}$')


def stage_of(key) -> str:
    """The Beam stage (or dask op) of a task key: its name without the token."""
    name = key[0] if isinstance(key, tuple) else key
    # One row per stage over all iterations: Iter003RowTimes -> Iter*RowTimes.
    return re.sub(r'Iter\d+', 'Iter*', _HEX.sub('', str(name)))


def breakdown(seen: dict, run: dict, workers: int) -> dict:
    """Where the Dask run's wall time goes, from the cluster's records."""
    tasks = seen['tasks']
    out = {'tasks': len(tasks), 'graphs': len(seen['graphs'])}
    actions = collections.Counter()
    by_stage = collections.defaultdict(lambda: [0, 0.0, 0.0, 0])   # n, compute, other, bytes
    first, last = float('inf'), 0.0
    for t in tasks:
        s = by_stage[stage_of(t['key'])]
        s[0] += 1
        s[3] += t.get('nbytes') or 0
        for ss in t['startstops']:
            d = ss['stop'] - ss['start']
            actions[ss['action']] += d
            if ss['action'] == 'compute':
                s[1] += d
                first, last = min(first, ss['start']), max(last, ss['stop'])
            else:
                s[2] += d
    out['actions'] = dict(actions)
    out['stages'] = {k: v for k, v in sorted(by_stage.items(), key=lambda kv: -kv[1][1])}
    out['first_task'], out['last_task'] = (first, last) if tasks else (None, None)
    out['span'] = last - first if tasks else 0.0
    out['busy'] = actions.get('compute', 0.0)
    out['idle'] = workers * out['span'] - sum(actions.values())
    graph_starts = []
    for g in seen['graphs']:
        m = g.get('metrics') or {}
        graph_starts.append({'start': m.get('start_timestamp_seconds'),
                             'seconds': m.get('duration_seconds'),
                             'tasks': m.get('tasks') or m.get('new_tasks')
                             or {k: v for k, v in m.items() if 'task' in k}})
    out['graph_submissions'] = graph_starts
    out['transfer_bytes'] = sum(t.get('total', 0) for t in seen['transfers'])
    out['transfer_count'] = len(seen['transfers'])
    out['transfer_seconds'] = sum(t.get('duration', 0) for t in seen['transfers'])
    out['fine'] = collections.defaultdict(float)
    for k, v in seen['fine'].items():
        if isinstance(k, tuple) and k and k[0] == 'execute' and k[-1] == 'seconds':
            out['fine'][k[-2]] += v        # activity: thread-cpu, deserialize, ...
        elif isinstance(k, tuple) and k and k[0] in ('gather-dep', 'get-data') \
                and k[-1] in ('seconds', 'bytes'):
            out['fine'][f'{k[0]} {k[-2]} ({k[-1]})'] += v
    out['fine'] = dict(out['fine'])
    # The run's clock: spawn -> first graph submission -> first task -> last -> exit.
    starts = [g['start'] for g in graph_starts if g['start']]
    sub = min(starts) if starts else None
    out['timeline'] = {
        'spawn_to_submit': (sub - run['started']) if sub else None,
        'submit_to_first_task': (first - sub) if sub and tasks else None,
        'tasks_span': out['span'],
        'last_task_to_exit': (run['ended'] - last) if tasks else None,
    }
    return out


# ---------------------------------------------------------------------------------
# Comparison and report
# ---------------------------------------------------------------------------------

def compare_models(a: pathlib.Path, b: pathlib.Path) -> dict[str, bool]:
    names = sorted({str(p.relative_to(a)) for p in (a / 'model').rglob('*') if p.is_file()}
                   | {str(p.relative_to(b)) for p in (b / 'model').rglob('*') if p.is_file()})
    return {n: (a / n).is_file() and (b / n).is_file()
            and (a / n).read_bytes() == (b / n).read_bytes() for n in names}


def _f(x, digits=1):
    return 'n/a' if x is None else f'{x:.{digits}f}'


def _mb(b):
    return f'{b / 1e6:,.1f}'


def phases(m: dict) -> str:
    ps = m.get('phase_seconds') or {}
    keys = ('build_graph', 'read_and_group', 'iterations', 'evaluate_and_write', 'pipeline',
            'total')
    s = ', '.join(f'{k} {ps[k]:.1f}' for k in keys if k in ps)
    per = ps.get('per_iteration')
    if per:
        s += f'; per iteration median {float(np.median(per)):.2f}'
    return s or 'n/a'


def main_table(direct: dict, dask: dict, identical: bool) -> str:
    rows = ['| runner | wall s (train command) | ratio to DirectRunner | trainer phase_seconds '
            '(metrics.json) | model files byte-identical |', '|---|---|---|---|---|']
    for name, r in (('DirectRunner in_memory', direct),
                    ('DaskRunner, scheduler + 2 workers (1 thread each)', dask)):
        rows.append(f'| {name} | {r["wall"]:.1f} | {r["wall"] / direct["wall"]:.2f}× | '
                    f'{phases(r["metrics"])} | {"yes" if identical else "NO"} |')
    return '\n'.join(rows) + '\n'


def breakdown_text(b: dict, dask: dict, workers: int) -> str:
    t = b['timeline']
    lines = ['Where the Dask run\'s time goes (measured on the cluster during this run):', '',
             '| part of the Dask run | seconds | note |', '|---|---|---|']
    lines.append(f'| spawn → first graph submission | {_f(t["spawn_to_submit"])} | trainer '
                 'start-up, Beam graph build, translation to dask, graph upload '
                 f'(metrics.json build_graph {dask["metrics"]["phase_seconds"].get("build_graph", 0):.1f}) |')
    gs = b['graph_submissions']
    lines.append(f'| scheduler update-graph ({b["graphs"]} submission(s)) | '
                 f'{_f(sum(g["seconds"] or 0 for g in gs))} | '
                 'deserialize, materialize and order the graph |')
    lines.append(f'| submission → first task starts | {_f(t["submit_to_first_task"])} | |')
    lines.append(f'| first task → last task (span) | {_f(t["tasks_span"])} | '
                 f'{b["tasks"]:,} tasks on {workers} workers |')
    acts = b['actions']
    for a in sorted(acts, key=lambda a: -acts[a]):
        lines.append(f'| &nbsp;&nbsp;tasks: {a} (summed over workers) | {acts[a]:.1f} | |')
    lines.append(f'| &nbsp;&nbsp;workers idle within the span ({workers} × span − the above) | '
                 f'{b["idle"]:.1f} | waiting on dependencies, scheduler round trips |')
    lines.append(f'| last task → trainer exit | {_f(t["last_task_to_exit"])} | results '
                 'gathered, metrics, report and plot written |')
    lines.append(f'| bytes transferred between workers | {_mb(b["transfer_bytes"])} MB | '
                 f'{b["transfer_count"]:,} transfers, {b["transfer_seconds"]:.1f} s |')
    fine = b['fine']
    if fine:
        lines.append('| workers\' fine metrics (execute, seconds) | ' + ', '.join(
            f'{k} {v:.1f}' for k, v in sorted(fine.items(), key=lambda kv: -kv[1])
            if '(' not in k) + ' | |')
    lines += ['', 'Tasks by stage (the dask key without its token: fused dask ops and the Beam label of the ParDo, iterations summed; top 15 by compute time):', '',
              '| stage | tasks | compute s | transfer/deserialize s | result MB |',
              '|---|---|---|---|---|']
    for name, (n, comp, other, nbytes) in list(b['stages'].items())[:15]:
        lines.append(f'| `{name}` | {n:,} | {comp:.1f} | {other:.1f} | {_mb(nbytes)} |')
    return '\n'.join(lines) + '\n'


def section(args, direct, dask, identical, files, load, bd, versions) -> str:
    ratio = dask['wall'] / direct['wall']
    flags = ' '.join(args.train_args)
    text = [
        '## Dask: a scheduler and 2 workers against the DirectRunner', '',
        f'`python bench/bench_dask.py {" ".join(sys.argv[1:])}`'.replace('` ', '`') +
        f' — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, '
        f'{platform.node()}, {os.cpu_count()} cores, load average at start/end: '
        f'{load[0]:.1f} / {load[1]:.1f} (1 min); {versions}.', '',
        f'Synthetic `{args.preset}` preset (seed 0, {direct["metrics"]["lines"]["kept"]:,} '
        f'ratings), `python -m pipeline.train --input DATA --output OUT {flags}` (default '
        'model and flags otherwise), one run each, one after the other: DirectRunner with '
        '`--runner DirectRunner --direct_running_mode in_memory`; Dask with '
        f'`--runner {DASK_RUNNER} --dask_client_address 127.0.0.1:PORT --shared_work_dir` '
        'against a `dask scheduler` and two `dask worker --nthreads 1 --no-nanny` processes '
        'on 127.0.0.1 (OPENBLAS_NUM_THREADS=1), started before the run. Wall: the train '
        'command, spawn to exit.', '',
        main_table(direct, dask, identical),
        f'Ratio: **{ratio:.2f}×** (target ≤ {TARGET:g}×: '
        f'{"met" if ratio <= TARGET else "NOT met"}). Files compared under model/: '
        + ', '.join(f'{n.removeprefix("model/")} {"=" if ok else "≠"}' for n, ok in files.items())
        + '.', '']
    if bd is not None:
        text.append(breakdown_text(bd, dask, 2))
    return '\n'.join(text)


def versions() -> str:
    import apache_beam
    import dask
    import distributed
    return (f'Python {platform.python_version()}, apache-beam {apache_beam.__version__}, '
            f'dask {dask.__version__}, distributed {distributed.__version__}')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--preset', default='ml-1m', help='pipeline/io/synth.py preset. Default: ml-1m.')
    ap.add_argument('--num_iters', type=int, default=10)
    ap.add_argument('--keep', action='store_true', help='keep the runs\' folder')
    ap.add_argument('--no_write', action='store_true', help='print only; BENCHMARKS.md untouched')
    ap.add_argument('--always_breakdown', action='store_true',
                    help='the breakdown table even when Dask is within 3×')
    args = ap.parse_args()
    args.train_args = ['--num_iters', str(args.num_iters)]
    load_start = os.getloadavg()[0]
    data = data_file(args.preset)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix='runs-', dir=CACHE))
    print(f'data {data}; runs in {work}', flush=True)
    base = ['--input', str(data), *args.train_args]
    direct = train([*base, '--runner', 'DirectRunner', '--direct_running_mode', 'in_memory'],
                   work / 'direct', work / 'direct.log')
    print(f'DirectRunner in_memory: {direct["wall"]:.1f} s', flush=True)
    cluster = Cluster(work)
    try:
        cursor = before_run(cluster.client)
        dask = train([*base, '--runner', DASK_RUNNER, '--dask_client_address',
                      cluster.address, '--shared_work_dir'], work / 'dask', work / 'dask.log')
        print(f'Dask: {dask["wall"]:.1f} s', flush=True)
        seen = after_run(cluster.client, cursor)
    finally:
        cluster.close()
    files = compare_models(work / 'direct', work / 'dask')
    identical = bool(files) and all(files.values())
    ratio = dask['wall'] / direct['wall']
    bd = breakdown(seen, dask, 2) if (ratio > TARGET or args.always_breakdown) else None
    (work / 'cluster.json').write_text(json.dumps(
        {'breakdown': bd, 'direct_wall': direct['wall'], 'dask_wall': dask['wall']},
        default=str, indent=1))
    load_end = os.getloadavg()[0]
    text = section(args, direct, dask, identical, files, (load_start, load_end), bd, versions())
    print(text)
    if not args.no_write:
        write_section(ROOT / 'BENCHMARKS.md', 'dask', text)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if identical else 1


if __name__ == '__main__':
    sys.exit(main())

"""Benchmark of the HTTP server (issue 21): python -m pipeline.serve against a baseline
that does what the original App Engine app did, on the 10m synthetic model, with the
same load generator in the same run.

    apt-get install -y wrk                  # the load generator (Debian package)
    pip install -r bench/requirements.txt   # Flask and gunicorn, for the baseline only
    nice -n 10 python bench/bench_serve.py  # writes bench/results/serve.md and its
                                            # section of BENCHMARKS.md
    nice -n 10 python bench/bench_serve.py --workers 1,2   # ours at 1 and 2 workers

Servers (all on 127.0.0.1, started by this script, stopped at its end):
  ours      python -m pipeline.serve --model_root ROOT --workers W (the model promoted
            into a fresh root of its own), GET /recommend?user=ID&k=10 (seen items
            excluded: the default). With several --workers counts, one such server per
            count, labelled `ours w=W` (one count: `ours`, W in the header).
  baseline  bench/serve_baseline.py: the original's per-request logic (col.dot(user),
            a full argsort, seen items removed) in Flask under gunicorn with sync
            workers, as the original was deployed (`gunicorn -b :$PORT main:app`: one
            worker); GET /recommendation?userId=ID&numRecs=10

Load: wrk (C, event-driven; keeps connections alive where the server allows) with
bench/serve_wrk.lua, which draws a user at random per request (seeded per thread) from
5,000 users of the model (never the one at row 0, whom the original refuses). Each
level of concurrent connections (1, 8, 32, 128) runs `--seconds` per server after a
2 s warm-up, ours (each worker count) then the baseline's, so all see the same machine
state.
Errors: socket errors (connect, read, write, timeout > 2 s) plus non-2xx answers.

Reload pause: ours (each worker count in turn) at 32 connections, `--reload_runs` runs
of `--reload_seconds` in steady state, and as many runs during each of which a new
version (the same files under a new version name, copied beforehand) is promoted 1 s
in; the server (every worker) loads, verifies and swaps it while serving. p99 of each
kind of run, and max.

The model: trained once by the trainer on the 10m set (wals, --latent_factors 32,
--num_iters 1: serving speed does not depend on quality) and cached in
output/bench-serve/ (retrained if the data file changes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))

from prepare_data import cpu_model, paths, prepare  # noqa: E402
from run_bench import write_section  # noqa: E402
from pipeline.store.model_root import promote  # noqa: E402

CACHE = ROOT / 'output' / 'bench-serve'
LEVELS = (1, 8, 32, 128)
VERDICT = {True: 'PASS', False: 'MISS'}
TRAIN_ARGS = ['--latent_factors', '32', '--num_iters', '1']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _load() -> float:
    return os.getloadavg()[0]


def ensure_model(data: str) -> pathlib.Path:
    """The cached 10m model, trained if missing or made from another data file."""
    prepare(data)
    raw = paths(data)['raw']
    model = CACHE / f'model-{data}'
    stamp = CACHE / f'model-{data}.json'
    want = {'data': str(raw), 'size': raw.stat().st_size, 'mtime': raw.stat().st_mtime,
            'train_args': TRAIN_ARGS}
    if (model / '_SUCCESS').exists() and stamp.exists() and \
            json.loads(stamp.read_text()) == want:
        return model
    print(f'[model] training on {raw} ({" ".join(TRAIN_ARGS)})', flush=True)
    subprocess.run([sys.executable, '-m', 'pipeline.train', '--input', str(raw), '--output',
                    str(model), '--overwrite', *TRAIN_ARGS], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    stamp.write_text(json.dumps(want))
    return model


def version(i: int) -> str:
    """Version names that sort after each other and after any earlier run's."""
    t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=i)
    return f'{t:%Y%m%dT%H%M%S}Z-{i:08x}'


def add_version(root: pathlib.Path, model: pathlib.Path, name: str) -> str:
    shutil.copytree(model, root / 'versions' / name)
    return name


def users_file(model: pathlib.Path, n: int = 5000) -> pathlib.Path:
    users = np.load(model / 'model' / 'user.npy', allow_pickle=False)
    rng = np.random.default_rng(0)
    pick = rng.choice(np.arange(1, len(users)), size=min(n, len(users) - 1), replace=False)
    out = CACHE / 'users.txt'
    out.write_text('\n'.join(str(u) for u in users[pick]) + '\n')
    return out


class Server:
    def __init__(self, name: str, cmd: list[str], ready_path: str, env: dict, log: pathlib.Path):
        self.name, self.cmd, self.ready_path, self.env, self.log = name, cmd, ready_path, env, log
        self.proc = None

    def start(self, timeout: float = 600) -> 'Server':
        with open(self.log, 'wb') as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f'{self.name} server exited; see {self.log}')
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise SystemExit(f'{self.name} server not ready after {timeout} s; see {self.log}')

    def cpu_seconds(self) -> float:
        """User + system CPU of every process in the server's process group (gunicorn's
        workers too), from /proc."""
        ticks = 0
        for stat in pathlib.Path('/proc').glob('[0-9]*/stat'):
            try:
                fields = stat.read_text().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:        # field 5: process group
                ticks += int(fields[11]) + int(fields[12])   # fields 14, 15: utime, stime
        return ticks / os.sysconf('SC_CLK_TCK')

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)     # gunicorn's workers too
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def wrk(url: str, path: str, users: pathlib.Path, clients: int, seconds: float,
        background: bool = False):
    cmd = ['wrk', f'-t{min(clients, 2)}', f'-c{clients}', f'-d{int(seconds)}s', '--timeout', '2s',
           '-s', str(ROOT / 'bench' / 'serve_wrk.lua'), url, '--', str(users), path, '1']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if background:
        return proc
    return parse(proc)


def parse(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=600)
    for line in out.splitlines():
        if line.startswith('WRK_JSON '):
            r = json.loads(line[len('WRK_JSON '):])
            r['rps'] = r['requests'] / (r['duration_us'] / 1e6)
            r['errors'] = sum(r[k] for k in ('connect', 'read', 'write', 'status', 'timeout'))
            return r
    raise SystemExit(f'wrk printed no summary:\n{out}')


def readyz_version(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url + '/readyz', timeout=10) as r:
            return json.loads(r.read())['model_version']
    except (urllib.error.URLError, KeyError, ValueError):
        return None


def all_swapped(url: str, name: str, timeout: float = 60) -> bool:
    """Whether every worker serves version `name` within `timeout` s: each worker
    polls LATEST itself, so 16 answers in a row (new connections, any worker) must
    all name it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(readyz_version(url) == name for _ in range(16)):
            return True
        time.sleep(0.2)
    return False


def machine() -> str:
    cpu = cpu_model('')
    return (f'{platform.machine()} {cpu}, {os.cpu_count()} CPUs (shared), Python '
            f'{platform.python_version()}, numpy {np.__version__}')


def _commit() -> str:
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--data', default='10m', help='Data set (bench/prepare_data.py). '
                    'Default: 10m.')
    ap.add_argument('--seconds', type=int, default=10, help='Per level and server. '
                    'Default: 10.')
    ap.add_argument('--levels', default=','.join(map(str, LEVELS)),
                    help='Concurrent connections. Default: 1,8,32,128.')
    ap.add_argument('--workers', default='1',
                    help="Our server's --workers; a comma list runs one server per count "
                         "(labelled 'ours w=N'). Default: 1.")
    ap.add_argument('--baseline_workers', type=int, default=1,
                    help="gunicorn sync workers of the baseline. Default: 1 (the original's "
                         'deployment).')
    ap.add_argument('--reload_runs', type=int, default=3)
    ap.add_argument('--reload_seconds', type=int, default=5)
    ap.add_argument('--no_write', action='store_true')
    args = ap.parse_args(argv)
    if not shutil.which('wrk'):
        raise SystemExit('wrk not found: apt-get install -y wrk')
    try:
        import flask  # noqa: F401
        import gunicorn  # noqa: F401
    except ImportError:
        raise SystemExit('Flask and gunicorn not found: pip install -r bench/requirements.txt')
    levels = [int(x) for x in args.levels.split(',')]
    workers = [int(x) for x in args.workers.split(',')]
    if len(set(workers)) != len(workers) or min(workers) < 1:
        raise SystemExit('--workers: distinct counts of at least 1, e.g. 1,2')
    CACHE.mkdir(parents=True, exist_ok=True)
    model = ensure_model(args.data)
    users = users_file(model)

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ours_list, roots = [], {}
    for w in workers:
        name = 'ours' if len(workers) == 1 else f'ours w={w}'
        # A root per server: a promotion for one server's reload runs leaves the
        # others (idle meanwhile) alone.
        root = roots[name] = CACHE / f'root-w{w}'
        shutil.rmtree(root, ignore_errors=True)
        promote(str(root), add_version(root, model, version(0)), {})
        ours = Server(name, [], '/readyz', env, CACHE / f'ours-w{w}.log')
        ours.port = _free_port()
        ours.cmd = [sys.executable, '-m', 'pipeline.serve', '--model_root', str(root),
                    '--poll_interval', '0.5', '--workers', str(w), '--port', str(ours.port)]
        ours_list.append(ours)
    base = Server('baseline', [], '/readiness_check', dict(env, BASELINE_MODEL=str(model)),
                  CACHE / 'baseline.log')
    base.port = _free_port()
    base.cmd = [sys.executable, '-m', 'gunicorn', '-b', f'127.0.0.1:{base.port}', '-w',
                str(args.baseline_workers), '--chdir', str(ROOT / 'bench'),
                'serve_baseline:app']
    servers = [*ours_list, base]
    paths_ = {s.name: '/recommend?user=%s&k=10' for s in ours_list}
    paths_['baseline'] = '/recommendation?userId=%s&numRecs=10'
    results: dict[tuple[str, int], dict] = {}
    reloads = {s.name: {'steady': [], 'promotion': []} for s in ours_list}
    try:
        for server in servers:
            t = time.monotonic()
            server.start()
            print(f'[{server.name}] ready in {time.monotonic() - t:.1f} s', flush=True)
        for c in levels:
            for server in servers:
                wrk(server.url, paths_[server.name], users, c, 2)          # warm-up
                load, cpu = _load(), server.cpu_seconds()
                r = wrk(server.url, paths_[server.name], users, c, args.seconds)
                r['load'] = load
                r['cpu_us'] = (server.cpu_seconds() - cpu) / max(r['requests'], 1) * 1e6
                results[(server.name, c)] = r
                print(f'[{server.name}] {c:4d} clients: {r["rps"]:8.0f} req/s  p50 '
                      f'{r["p50_us"] / 1e3:7.2f} ms  p99 {r["p99_us"] / 1e3:8.2f} ms  '
                      f'errors {r["errors"]}  CPU {r["cpu_us"]:.0f} us/req  (load {load:.1f})',
                      flush=True)
        base.stop()
        for ours in ours_list:
            root, reload = roots[ours.name], reloads[ours.name]
            for i in range(args.reload_runs):
                r = wrk(ours.url, paths_[ours.name], users, 32, args.reload_seconds)
                reload['steady'].append(r)
                name = add_version(root, model, version(i + 1))
                proc = wrk(ours.url, paths_[ours.name], users, 32, args.reload_seconds,
                           background=True)
                time.sleep(1.0)
                promote(str(root), name, {})
                r = parse(proc)
                r['swapped'] = all_swapped(ours.url, name)
                reload['promotion'].append(r)
                print(f'[reload {ours.name}] steady p99 '
                      f'{reload["steady"][-1]["p99_us"] / 1e3:.2f} ms, during promotion p99 '
                      f'{r["p99_us"] / 1e3:.2f} ms max {r["max_us"] / 1e3:.1f} ms '
                      f'(swapped: {r["swapped"]}, errors {r["errors"]})', flush=True)
            ours.stop()      # idle from here on: out of the next server's runs
    finally:
        for server in servers:
            server.stop()

    text = report(args, argv, results, reloads, levels, model, [s.name for s in ours_list])
    print(text)
    if not args.no_write:
        out = ROOT / 'bench' / 'results' / 'serve.md'
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        write_section(ROOT / 'BENCHMARKS.md', 'serve', text)
        print(f'wrote {out} and its section of BENCHMARKS.md')
    return 0


def report(args, argv, results, reloads, levels, model, ours_names) -> str:
    users = np.load(model / 'model' / 'user.npy', allow_pickle=False)
    items = np.load(model / 'model' / 'item.npy', allow_pickle=False)
    cmd = ' '.join(['nice -n 10 python bench/bench_serve.py',
                    *(argv if argv is not None else sys.argv[1:])])
    ours_label = (f'{args.workers} server process(es) on one port' if len(ours_names) == 1
                  else 'one server per count, `ours w=N` in the tables')
    lines = [
        '## Online recommendations: HTTP server vs the original app (bench/bench_serve.py)', '',
        f'Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Commit: '
        f'{_commit()}. Machine: {machine()}.',
        f'Command: `{cmd}`',
        f'Model: {args.data} synthetic set, {len(users):,} users × {len(items):,} items, wals '
        f'k=32. Request: top 10 for a random user of 5,000, seen items excluded. Load: wrk on '
        f'loopback, {args.seconds:g} s per level after a 2 s warm-up. Ours: '
        f'`--workers {args.workers}` ({ours_label}; each worker holds its own copy of the '
        'model). Baseline: the original '
        f"app's logic in Flask under gunicorn, {args.baseline_workers} sync worker(s). "
        '`load`: 1-minute load average before the run (other jobs share the machine: the '
        'latencies and rates are provisional; the ratios are from the same run). `CPU/req`: '
        "user + system CPU of the server's processes during the run, per request answered "
        '(what a request costs, whatever else runs on the machine).', '',
        '| clients | server | req/s | p50 ms | p99 ms | errors | CPU/req µs | load |',
        '|---:|---|---:|---:|---:|---:|---:|---:|',
    ]
    for c in levels:
        for name in (*ours_names, 'baseline'):
            r = results[(name, c)]
            lines.append(f'| {c} | {name} | {r["rps"]:,.0f} | {r["p50_us"] / 1e3:.2f} | '
                         f'{r["p99_us"] / 1e3:.2f} | {r["errors"]} | {r["cpu_us"]:,.0f} | '
                         f'{r["load"]:.1f} |')
    lines += ['',
              '| clients | server | throughput ours / baseline | CPU per request baseline / ours |',
              '|---:|---|---:|---:|']
    for c in levels:
        b = results[('baseline', c)]
        for name in ours_names:
            o = results[(name, c)]
            lines.append(f'| {c} | {name} | {o["rps"] / b["rps"]:.1f}× | '
                         f'{b["cpu_us"] / o["cpu_us"]:.1f}× |')
    if 32 in levels:
        lines += ['', '| goal (32 clients) | server | measured | result |', '|---|---|---:|---|']
        for name in ours_names:
            p99 = results[(name, 32)]['p99_us'] / 1e3
            ratio = results[(name, 32)]['rps'] / results[('baseline', 32)]['rps']
            good_p99, good_rate = p99 <= 10, ratio >= 3
            lines += [f'| p99 ≤ 10 ms | {name} | {p99:.2f} ms | {VERDICT[good_p99]} |',
                      f'| throughput ≥ 3× baseline | {name} | {ratio:.1f}× | '
                      + f'{VERDICT[good_rate]} |']
    if any(reload['steady'] for reload in reloads.values()):
        def med(runs, key):
            return statistics.median(r[key] for r in runs) / 1e3
        lines += ['', (f'Reload pause (32 clients, {args.reload_runs} runs of '
                       f'{args.reload_seconds:g} s each; a promotion 1 s into each promotion '
                       'run, the new version loaded, verified and swapped in while serving):'),
                  '', ('| server | runs | p50 ms | p99 ms (median of runs) | worst p99 ms | '
                       'max ms | errors |'), '|---|---|---:|---:|---:|---:|---:|']
        for name in ours_names:
            for kind in ('steady', 'promotion'):
                runs = reloads[name][kind]
                lines.append(f'| {name} | {kind} | {med(runs, "p50_us"):.2f} | '
                             f'{med(runs, "p99_us"):.2f} | '
                             f'{max(r["p99_us"] for r in runs) / 1e3:.2f} | '
                             f'{max(r["max_us"] for r in runs) / 1e3:.1f} | '
                             f'{sum(r["errors"] for r in runs)} |')
        swapped = ', '.join(
            f'{name}: {sum(r.get("swapped", False) for r in runs)} of {len(runs)}'
            for name, runs in ((n, reloads[n]['promotion']) for n in ours_names))
        lines.append(f'\nVersions swapped in (by every worker) during the promotion runs: '
                     f'{swapped}.')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    sys.exit(main())

"""Benchmark harness: the WALS Beam pipeline against wals_core, implicit and Spark ALS.

    bench/setup_env.sh                                  # once: bench/.venv with the peers
    bench/.venv/bin/python bench/run_bench.py           # 100k, 1m, 10m -> BENCHMARKS.md
    bench/.venv/bin/python bench/run_bench.py --quick   # smoke run: 100k and 1m
    bench/.venv/bin/python bench/run_bench.py --sizes 100k,10m --also 20m:beam_inmem@32

Every (data set, method, rank) case runs in its own process, one at a time, on the
same cached data and the same train/test split (bench/prepare_data.py). The parent
spawns it, samples the RSS of its whole process tree every 0.1 s (psutil) and reaps
it with os.wait4 (CPU seconds and the largest single-process max RSS of the tree).
Results (JSON per case, logs, models) go to --work (default output/bench-runs/STAMP),
the report to --out (default BENCHMARKS.md), and the tables are printed too.

Methods (NAME@RANK selects one rank; default ranks in brackets):
  pandas_read     pandas.read_csv of the raw ratings file (the yardstick of reading) [0]
  beam_inmem      python -m pipeline.train, DirectRunner --direct_running_mode in_memory [10, 32]
  beam_cg         same, --solver cg [32]
  beam_implicit   same, --model implicit [10, 32]
  beam_explicit   same, --model explicit [10, 32]
  beam_eval       same, --eval_every 1 (test metrics after every iteration) [10]
  beam_lastobj    same, --objective_every 0 (the training objective after the last
                  iteration only, as the core and the peers) [10, 32]
  beam_mp         python -m pipeline.train, multi_processing --direct_num_workers 2 [10]
  beam_cli        python -m pipeline.train --input F --output D, all defaults (k=5,
                  20 iterations): the ./run_local.sh-equivalent run, 100k only [5]
  wals_core       wals_core.train in memory, read -> split -> train -> write [10, 32]
  wals_core_cg    same, solver cg (3 steps, warm-started) [32]
  implicit_exact  implicit AlternatingLeastSquares, use_cg=False, 2 threads [32]
  implicit_cg     implicit AlternatingLeastSquares, CG (default), 2 threads [32]
  spark           Spark MLlib ALS, local[2], explicit, regParam 0.1 [10]
  numpy_floor     the numpy kernels an exact ALS iteration cannot skip [10, 32]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time

import psutil

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / 'bench'
sys.path.insert(0, str(BENCH))

from prepare_data import ALL_SIZES, cpu_model, paths  # noqa: E402

ITERS = 10
GIB = 1 << 30
# The pipeline's command line, DirectRunner in_memory, with what each variant adds.
BEAM_VARIANTS = {'beam_inmem': [], 'beam_cg': ['--solver', 'cg'],
                 'beam_implicit': ['--model', 'implicit'],
                 'beam_explicit': ['--model', 'explicit'],
                 'beam_eval': ['--eval_every', '1'],
                 'beam_lastobj': ['--objective_every', '0']}
BEAM_METHODS = ('beam_mp', 'beam_cli', *BEAM_VARIANTS)
METHOD_ORDER = ('pandas_read', 'beam_cli', 'beam_inmem', 'beam_cg', 'beam_implicit',
                'beam_explicit', 'beam_eval', 'beam_lastobj', 'beam_mp', 'wals_core',
                'wals_core_cg', 'numpy_floor', 'implicit_exact', 'implicit_cg', 'spark')
DEFAULT_RANKS = {'beam_inmem': (10, 32), 'beam_mp': (10,), 'beam_cli': (5,),
                 'beam_cg': (32,), 'beam_implicit': (10, 32), 'beam_explicit': (10, 32),
                 'beam_eval': (10,), 'beam_lastobj': (10, 32), 'pandas_read': (0,),
                 'wals_core': (10, 32), 'wals_core_cg': (32,), 'implicit_exact': (32,),
                 'implicit_cg': (32,), 'spark': (10,), 'numpy_floor': (10, 32)}


# ---------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------

def plan(sizes: list[str], methods: list[str] | None, iters: int,
         case_iters: dict[str, int]) -> list[dict]:
    """The cases to run, in order: sizes ascending, methods in METHOD_ORDER."""
    wanted: dict[str, tuple | None] = {}
    if methods:
        for m in methods:
            name, _, rank = m.partition('@')
            if name not in DEFAULT_RANKS:
                raise SystemExit(f'unknown method {name!r}; choose from {", ".join(METHOD_ORDER)}')
            if rank:
                wanted[name] = tuple(sorted(set((wanted.get(name) or ()) + (int(rank),))))
            else:
                wanted.setdefault(name, None)
    cases = []
    for size in sizes:
        for name in METHOD_ORDER:
            if methods and name not in wanted:
                continue
            explicit = wanted.get(name)
            ranks = explicit or DEFAULT_RANKS[name]
            for rank in ranks:
                if name == 'beam_cli' and size != '100k':
                    continue
                key = f'{name}@{rank}'
                n = 20 if name == 'beam_cli' else case_iters.get(key, iters)
                cases.append({'size': size, 'method': name, 'rank': rank, 'iters': n,
                              'id': f'{size}-{name}-k{rank}'})
    return cases


def command(case: dict, py: str, work: pathlib.Path) -> tuple[list[str], pathlib.Path]:
    out = work / case['id']
    m = case['method']
    if m in BEAM_METHODS:
        cmd = [py, '-m', 'pipeline.train', '--input', str(paths(case['size'])['raw']),
               '--output', str(out)]
        if m != 'beam_cli':
            cmd += ['--latent_factors', str(case['rank']), '--num_iters', str(case['iters']),
                    '--runner', 'DirectRunner']
            cmd += (['--direct_running_mode', 'multi_processing', '--direct_num_workers', '2']
                    if m == 'beam_mp' else
                    ['--direct_running_mode', 'in_memory'] + BEAM_VARIANTS[m])
        return cmd, out
    return [py, str(BENCH / 'workers.py'), m, '--data', case['size'], '--rank',
            str(case['rank']), '--iters', str(case['iters']), '--out', str(out),
            '--result', str(out / 'result.json')], out


def snapshot_code(work: pathlib.Path) -> dict:
    """Copies pipeline/ and wals_core/ into WORK/code: every case of the run imports
    this copy, so edits made to the tree while a run is going cannot mix versions."""
    import hashlib
    import shutil
    dest = work / 'code'
    if dest.exists():
        shutil.rmtree(dest)
    digest = hashlib.sha256()
    files = {}
    for pkg in ('pipeline', 'wals_core'):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns('__pycache__'))
        for f in sorted((dest / pkg).rglob('*.py')):
            data = f.read_bytes()
            digest.update(str(f.relative_to(dest)).encode() + b'\0' + data)
            files[str(f.relative_to(dest))] = hashlib.sha256(data).hexdigest()[:12]
    git = {}
    try:
        git['head'] = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                                     capture_output=True, text=True).stdout.strip()
        status = subprocess.run(['git', 'status', '--porcelain', '--', 'pipeline', 'wals_core'],
                                cwd=ROOT, capture_output=True, text=True).stdout
        git['uncommitted'] = [line[3:] for line in status.splitlines() if line.strip()]
    except OSError:
        pass
    return {'root': str(dest), 'sha256': digest.hexdigest()[:16], 'files': files, **git}


# ---------------------------------------------------------------------------------
# Running one case: wall, startup, tree RSS, CPU
# ---------------------------------------------------------------------------------

def _tree_rss(proc: psutil.Process, cpu: dict) -> int:
    """Summed RSS of the tree; records each process's latest CPU seconds in `cpu`."""
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
            t = p.cpu_times()
            cpu[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return total


def run_case(case: dict, py: str, work: pathlib.Path, timeout: float,
             code_root: pathlib.Path = ROOT) -> dict:
    cmd, out = command(case, py, work)
    out.mkdir(parents=True, exist_ok=True)
    res = dict(case, **run_process(cmd, work / f'{case["id"]}.log', timeout, code_root))
    if res['status'] == 'ok':
        try:
            res.update(_beam_result(out, res['spawn']) if case['method'] in BEAM_METHODS
                       else _worker_result(out, res['spawn']))
        except (OSError, KeyError, ValueError) as e:
            res['status'] = f'FAILED (no result: {e})'
    return res


def run_process(cmd: list[str], log_path: pathlib.Path, timeout: float,
                code_root: pathlib.Path = ROOT) -> dict:
    """Runs cmd in its own session (cwd and imports: code_root), output to log_path;
    returns spawn time, process wall, exit status, CPU seconds, peak RSS and load."""
    env = dict(os.environ, PYTHONPATH=str(code_root), BENCH_CODE_ROOT=str(code_root),
               PYTHONUNBUFFERED='1')
    load_before = os.getloadavg()
    peak = [0]
    cpu_seen: dict[int, float] = {}
    done = threading.Event()
    with open(log_path, 'wb') as log:
        log.write((shlex.join(cmd) + '\n').encode())
        log.flush()
        spawn = time.time()
        proc = subprocess.Popen(cmd, cwd=code_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        ps = psutil.Process(proc.pid)
        timed_out = [False]

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss(ps, cpu_seen))
                if time.time() - spawn > timeout and not timed_out[0]:
                    timed_out[0] = True
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)   # our own session only
                    except ProcessLookupError:
                        pass
                done.wait(0.1)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        end = time.time()
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    # Whatever the case left behind in its session (e.g. a JVM) is ours to end.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    res = dict(command=shlex.join(cmd), log=str(log_path), spawn=spawn,
               process_wall=end - spawn, exit_code=proc.returncode,
               # wait4 misses descendants nobody reaps (Spark's JVM); sampling misses
               # the last 0.1 s of each process: take the larger.
               cpu_seconds=max(usage.ru_utime + usage.ru_stime, sum(cpu_seen.values())),
               peak_rss_tree=peak[0], max_rss_single=usage.ru_maxrss * 1024,
               load_before=load_before[0], load_after=os.getloadavg()[0],
               status='ok' if proc.returncode == 0 else
               ('TIMEOUT' if timed_out[0] else f'FAILED (exit {proc.returncode})'))
    res['peak_rss'] = max(res['peak_rss_tree'], res['max_rss_single'])
    return res


def _beam_result(out: pathlib.Path, spawn: float) -> dict:
    m = json.loads((out / 'metrics.json').read_text())
    ps = m['phase_seconds']
    per = ps['per_iteration']
    read_to_model = ps['read_and_group'] + ps['iterations'] + ps['evaluate_and_write']
    # metrics.json's phase clock stops right after model/col.npy is saved, so its
    # mtime places the run on the wall clock: read start = that - read_to_model.
    written = (out / 'model' / 'col.npy').stat().st_mtime
    return {'seconds_per_iteration': statistics.median(per) if per else None,
            'per_iteration': per,
            'per_iteration_how': 'median of metrics.json phase_seconds.per_iteration',
            # Seconds inside the numpy solves (summed over blocks and solve threads):
            # the rest of s/iter is the runner's (side inputs, shuffles, scheduling)
            # and the per-iteration objective's.
            'solve_per_iteration': (statistics.median(ps['solve_per_iteration'])
                                    if ps.get('solve_per_iteration') else None),
            'startup': written - read_to_model - spawn, 'read_to_model': read_to_model,
            'phases': {k: v for k, v in ps.items() if k != 'per_iteration'},
            'train_rmse': m.get('train_rmse'), 'test_rmse': m.get('test_rmse'),
            'train_ratings': m.get('train_ratings'), 'test_ratings': m.get('test_ratings')}


def _worker_result(out: pathlib.Path, spawn: float) -> dict:
    r = json.loads((out / 'result.json').read_text())
    res = {k: r.get(k) for k in ('seconds_per_iteration', 'per_iteration', 'per_iteration_how',
                                 'phases', 'train_rmse', 'test_rmse', 'train_ratings',
                                 'test_ratings', 'version', 'java', 'note')}
    res['startup'] = r['ready'] - spawn
    if r.get('read_to_model_override') is not None:
        res['read_to_model'] = r['read_to_model_override']
    elif r.get('read_start') is not None:
        res['read_to_model'] = r['model_written'] - r['read_start']
    return res


# ---------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------

def _f(x, digits=2, unit=''):
    if x is None:
        return 'n/a'
    if isinstance(x, float) and abs(x) >= 100:
        return f'{x:,.0f}{unit}'
    return f'{x:.{digits}f}{unit}'


def _gib(b):
    return 'n/a' if not b else f'{b / GIB:.2f}'


def machine_info(py: str) -> dict:
    cpu = cpu_model('unknown')
    probe = ("import json,sys,platform,numpy,scipy,apache_beam,threadpoolctl\n"
             "v={'python':platform.python_version(),'numpy':numpy.__version__,"
             "'scipy':scipy.__version__,'apache-beam':apache_beam.__version__}\n"
             "for m in ('implicit','pyspark','pandas','psutil'):\n"
             "  try: v[m]=__import__(m).__version__\n"
             "  except Exception as e: v[m]='missing'\n"
             "v['blas']='; '.join(f\"{i.get('internal_api')} {i.get('version')} "
             "({i.get('num_threads')} threads)\" for i in threadpoolctl.threadpool_info() "
             "if i.get('user_api')=='blas')\n"
             "print(json.dumps(v))")
    try:
        versions = json.loads(subprocess.run([py, '-c', probe], capture_output=True, text=True,
                                             cwd=ROOT, check=True).stdout)
    except (subprocess.CalledProcessError, json.JSONDecodeError) as e:
        versions = {'error': str(e)}
    try:
        jv = subprocess.run(['java', '-version'], capture_output=True, text=True)
        versions['java'] = (jv.stderr or jv.stdout).splitlines()[0]
    except (OSError, IndexError):
        versions['java'] = 'missing'
    return {'nproc': os.cpu_count(), 'cpu': cpu,
            'memory_gib': psutil.virtual_memory().total / GIB,
            'kernel': platform.release(), 'versions': versions}


def _find(results, size, method, rank):
    for r in results:
        if (r['size'], r['method'], r['rank']) == (size, method, rank) and r['status'] == 'ok':
            return r
    return None


def _ratio_row(target, what, num, den, limit, goal=None):
    if num is None or den is None or not den:
        return [target, what, 'n/a', f'≤ {limit:g}×', 'NOT RUN']
    ratio = num / den
    verdict = 'PASS' if ratio <= limit else 'FAIL'
    if goal is not None:
        verdict += f' (goal {goal:g}×: {"met" if ratio <= goal else "not met"})'
    return [target, what, f'{ratio:.2f}× ({_f(num)} / {_f(den)})', f'≤ {limit:g}×', verdict]


def _ratings(size: str) -> int:
    return json.loads(paths(size)['meta'].read_text())['ratings']


def _spi(r):
    return r and r.get('seconds_per_iteration')


def _phase(r, name):
    return r and (r.get('phases') or {}).get(name)


def targets(results) -> list[list[str]]:
    """The goals of the speed issue (numbered as its sections), from this run's 10m
    cases, plus the older goals this harness has always checked."""
    f = lambda m, k: _find(results, '10m', m, k)   # noqa: E731
    rows = [_ratio_row('1', 'wals_core CG k=32 s/iter vs implicit CG k=32 s/iter',
                       _spi(f('wals_core_cg', 32)), _spi(f('implicit_cg', 32)), 1.0),
            _ratio_row('2', 'beam_inmem k=10 s/iter vs Spark ALS marginal s/iter',
                       _spi(f('beam_inmem', 10)), _spi(f('spark', 10)), 0.5)]
    for rank in (10, 32):
        rows.append(_ratio_row('2', f'beam_inmem k={rank} s/iter vs wals_core k={rank} s/iter',
                               _spi(f('beam_inmem', rank)), _spi(f('wals_core', rank)), 1.3))
    # The same goals without the per-iteration objective, which neither the core nor
    # the peers compute (--objective_every 0).
    rows.append(_ratio_row('2', 'beam_lastobj k=10 s/iter vs Spark ALS marginal s/iter',
                           _spi(f('beam_lastobj', 10)), _spi(f('spark', 10)), 0.5))
    for rank in (10, 32):
        rows.append(_ratio_row('2', f'beam_lastobj k={rank} s/iter vs wals_core k={rank} '
                               's/iter', _spi(f('beam_lastobj', rank)),
                               _spi(f('wals_core', rank)), 1.3))
    rows.append(_ratio_row('2', 'beam_mp (2 workers) k=10 s/iter vs beam_inmem k=10 s/iter',
                           _spi(f('beam_mp', 10)), _spi(f('beam_inmem', 10)), 0.7))
    rows.append(_ratio_row('3', 'beam_inmem read→blocks (read_and_group) vs pandas.read_csv '
                           'of the same file', _phase(f('beam_inmem', 10), 'read_and_group'),
                           _phase(f('pandas_read', 0), 'read_csv'), 2.0))
    for model in ('implicit', 'explicit'):
        for rank in (10, 32):
            rows.append(_ratio_row('4', f'beam --model {model} k={rank} s/iter vs --model wals',
                                   _spi(f(f'beam_{model}', rank)), _spi(f('beam_inmem', rank)),
                                   1.1))
    b = f('beam_inmem', 10)
    rows.append(_ratio_row('5', 'beam_inmem k=10 evaluate_and_write (test RMSE + ranking '
                           'metrics + model files) vs its s/iter',
                           _phase(b, 'evaluate_and_write'), _spi(b), 1.0))
    e = f('beam_eval', 10)
    # Medians, like every s/iter here: one stalled iteration (the host's, not the
    # code's) must not decide the row.
    extra = _spi(e) - _spi(b) if _spi(e) is not None and _spi(b) is not None else None
    rows.append(_ratio_row('5', '--eval_every 1: extra seconds per checkpoint (median s/iter '
                           'minus beam_inmem\'s) vs beam_inmem k=10 s/iter', extra, _spi(b), 0.5))
    b20 = _find(results, '20m', 'beam_inmem', 32)
    any20 = [r for r in results if r['size'] == '20m' and r['method'] == 'beam_inmem'
             and r['rank'] == 32]
    if b20:
        rows.append(['6', 'beam_inmem k=32, 10 it, 20m: peak RSS (process tree)',
                     f'{_gib(b20["peak_rss"])} GiB ({b20["peak_rss"] / _ratings("20m"):.0f} '
                     'B/rating), '
                     f'{b20["process_wall"]:.0f} s wall', '≤ 4 GiB',
                     'PASS' if b20['peak_rss'] <= 4 * GIB else 'FAIL'])
    elif any20:
        rows.append(['6', 'beam_inmem k=32, 10 it, 20m', any20[0]['status'], '≤ 4 GiB', 'FAIL'])
    else:
        rows.append(['6', 'beam_inmem k=32, 10 it, 20m', 'not in this run: '
                     '`--also 20m:beam_inmem@32`',
                     '≤ 4 GiB', 'SEPARATE RUN'])
    for mode in ('beam_inmem', 'beam_mp'):
        r = f(mode, 10)
        if r:
            rows.append(['6', f'{mode} k=10, 10m: peak RSS (process tree)',
                         f'{_gib(r["peak_rss"])} GiB ({r["peak_rss"] / _ratings("10m"):.0f} '
                         'B/rating)',
                         '(reported)', '—'])
    # Older goals of this harness.
    sp = f('spark', 10)
    rows.append(_ratio_row('old 1b', 'beam_inmem k=10 read→model (10 it) vs Spark '
                           'load+fit(10)+write', b and b.get('read_to_model'),
                           sp and sp.get('read_to_model'), 1.0))
    rows.append(_ratio_row('old 2', 'wals_core k=32 s/iter vs implicit exact (Cholesky) s/iter',
                           _spi(f('wals_core', 32)), _spi(f('implicit_exact', 32)), 1.0,
                           goal=0.5))
    c = _find(results, '100k', 'beam_cli', 5)
    failed_cli = [r for r in results if r['method'] == 'beam_cli' and r['status'] != 'ok']
    if c:
        rows.append(['old 5', 'ML 100k, defaults (k=5, 20 it), CLI process wall incl. Beam '
                     'start-up', f'{c["process_wall"]:.1f} s', '≤ 15 s',
                     'PASS' if c['process_wall'] <= 15 else 'FAIL'])
    else:
        rows.append(['old 5', 'ML 100k CLI run', failed_cli[0]['status'] if failed_cli
                     else 'n/a', '≤ 15 s', 'FAIL' if failed_cli else 'NOT RUN'])
    return rows


def _table(header, rows) -> str:
    out = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    out += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
    return '\n'.join(out)


RESULT_HEADER = ['data', 'method', 'k', 'it', 's/iter', 'solve s/iter', 'startup s', 'read→model s',
                 'process wall s', 'CPU s', 'peak RSS GiB', 'train RMSE', 'test RMSE',
                 'load avg', 'status']


def result_rows(results):
    rows = []
    for r in results:
        rows.append([r['size'], r['method'], r['rank'], r['iters'],
                     _f(r.get('seconds_per_iteration'), 3),
                     _f(r.get('solve_per_iteration'), 3) if r.get('solve_per_iteration')
                     else '—', _f(r.get('startup'), 1),
                     _f(r.get('read_to_model'), 1), _f(r['process_wall'], 1),
                     _f(r['cpu_seconds'], 0), _gib(r['peak_rss']),
                     _f(r.get('train_rmse'), 4), _f(r.get('test_rmse'), 4),
                     f'{r["load_before"]:.1f}→{r["load_after"]:.1f}', r['status']])
    return rows


def growth_rows(results):
    rows = []
    for method, rank in (('beam_inmem', 32), ('beam_inmem', 10), ('beam_mp', 10),
                         ('wals_core', 10), ('wals_core', 32), ('implicit_exact', 32),
                         ('spark', 10)):
        base = None
        cells = []
        for size in ('1m', '10m', '20m'):
            r = _find(results, size, method, rank)
            if not r or r.get('seconds_per_iteration') is None:
                cells.append('—')
                continue
            spi, rtm = r['seconds_per_iteration'], r.get('read_to_model')
            base = base or (spi, rtm)
            rel = f' (×{spi / base[0]:.1f})' if base[0] else ''
            cells.append(f'{_f(spi, 2)} s/it{rel}; read→model {_f(rtm, 0)} s; '
                         f'{_gib(r["peak_rss"])} GiB')
        if any(c != '—' for c in cells):
            rows.append([f'{method} k={rank}'] + cells)
    return rows


def phase_rows(results):
    rows = []
    for r in results:
        ph = r.get('phases') or {}
        text = '; '.join(f'{k} {v:.1f}' for k, v in ph.items() if isinstance(v, (int, float)))
        per = r.get('per_iteration') or []
        its = ', '.join(f'{x:.2f}' for x in per)
        rows.append([r['size'], r['method'], r['rank'], text or '—', its or '—',
                     r.get('per_iteration_how') or '—'])
    return rows


def consistency_rows(results):
    """wals_core vs the pipeline on the same data, rank and split: RMSEs should agree."""
    rows = []
    pairs = {'wals_core': ('beam_inmem', 'beam_mp'), 'wals_core_cg': ('beam_cg',)}
    for w in results:
        if w['method'] not in pairs or w['status'] != 'ok' or w.get('test_rmse') is None:
            continue
        for mode in pairs[w['method']]:
            b = _find(results, w['size'], mode, w['rank'])
            if not b or b.get('test_rmse') is None or b['iters'] != w['iters']:
                continue
            dtr = abs(b['train_rmse'] - w['train_rmse'])
            dte = abs(b['test_rmse'] - w['test_rmse'])
            rows.append([w['size'], f'{mode} vs {w["method"]}', w['rank'],
                         f'{b["train_rmse"]:.6f} / {w["train_rmse"]:.6f}',
                         f'{b["test_rmse"]:.6f} / {w["test_rmse"]:.6f}',
                         'yes' if max(dtr, dte) < 1e-4 else f'NO (Δ {max(dtr, dte):.2g})'])
    return rows


def datasets_rows(sizes):
    rows = []
    for s in sizes:
        p = paths(s)
        try:
            meta = json.loads(p['meta'].read_text())
        except OSError:
            continue
        rec = meta['recipe']
        src = ('MovieLens 100k (../shared/data/ml-100k/u.data)' if s == '100k' else
               f'pipeline/io/synth.py preset {rec["preset"]}, seed {rec["seed"]} '
               f'(synth.py sha256 {rec["synth_sha256"][:12]})')
        rows.append([s, src, f'{meta["ratings"]:,}', f'{meta["users"]:,}', f'{meta["items"]:,}',
                     f'{meta["test_ratings"]:,}'])
    return rows


NOTES = """\
### How each number is measured

* **s/iter** — one iteration = all users solved, then all items.
  *Beam* (all modes): median of `metrics.json` `phase_seconds.per_iteration` (wall time
  between the moments the last item block of consecutive iterations finished).
  *wals_core*: median of wall times between the ends of consecutive column half-steps
  (`train(..., on_half_step)`). *implicit*: median of the per-iteration times its `fit`
  callback reports. *Spark*: marginal `(fit(maxIter=10) − fit(maxIter=1)) / 9`, both
  fits after a discarded warm-up `fit(maxIter=1)` (`fit_warmup` in the phase table),
  so neither pays the JIT compilation of the ALS code (without the warm-up, fit(1)
  alone pays it and the marginal comes out low by that cost / 9). Medians ignore the
  first-iteration warm-up; the marginal does too. (Beam and wals_core plan each
  block's solve on the first iteration — `wals_core.solve.RowSolver` — and reuse the
  plan afterwards: that first-iteration cost is in read→model, not in s/iter.) On
  small data the Spark marginal is dominated by noise and JIT/scheduling warm-up (it
  can come out near zero); its `fit_1`/`fit_10` are in the phase table.
* **it** — iterations the case ran (`--iters`, or `--case_iters` for a case whose
  only use is its s/iter, e.g. `wals_core@32=3` to keep a run short).
* **solve s/iter** — Beam: median of `metrics.json` `phase_seconds.solve_per_iteration`,
  the wall time inside the numpy solves summed over blocks. The rest of s/iter is the
  runner's (stages, side inputs, element transfer) and the training objective's,
  computed after every iteration for the convergence history (the profile section,
  `bench/profile_pipeline.py`, splits it by category).
* **pandas_read** — `pandas.read_csv(raw file, sep='\t', header=None)`, every column
  with inferred types: the yardstick of goal 3 against the pipeline's
  `read_and_group` phase (read, parse, vocabularies, split, rating blocks written).
* **beam_eval** — `--eval_every 1`: the test metrics (RMSE and ranking) after every
  iteration; goal 5's per-checkpoint cost is its median s/iter minus beam_inmem's
  (medians, so that one iteration stalled by the host does not decide it; the
  per-iteration times of both are in the phase table).
* **beam_lastobj** — `--objective_every 0`: the training objective and train RMSE
  after the last iteration only (the default computes them after every iteration,
  for the convergence history: a pass over every rating that the solves do not
  need). The core, `implicit` (`calculate_training_loss=False`, its default) and
  Spark ALS compute no per-iteration loss either, so this is the like-for-like
  row of goal 2; the model files are the same bits as beam_inmem's.
* **startup** — process spawn → ready to read data: interpreter + imports (all),
  SparkSession/JVM start (Spark), and for Beam graph construction + runner start
  (+ worker processes in multi_processing) up to the first read. For Beam the read
  start is placed on the wall clock as mtime(model/col.npy) − (read_and_group +
  iterations + evaluate_and_write), the pipeline's own phase clock.
* **read→model** — read of the ratings file → model files on disk, excluding startup.
  Beam: `read_and_group + iterations + evaluate_and_write` (includes the RMSE
  evaluation, which runs inside the pipeline before the write). wals_core: read
  (pandas) + vocabulary/split/CSR build + iterations + `np.save`. implicit: read of
  the pre-split file + CSR build + fit + save. Spark: `load + fit(maxIter=10) + write`
  (load = CSV read + filter + cache + count; the fit(1)s and evaluation excluded).
* **process wall** — spawn → exit of the case's process, everything included
  (Spark: also its two fit(1)s and RMSE evaluation; wals_core: also its RMSE evaluation).
* **CPU s** — user + system CPU of the case's process tree: the larger of os.wait4's
  figure (waited-for descendants) and the sum over the tree's processes of their
  CPU times sampled every 0.1 s (catches Spark's JVM, which nobody reaps).
* **peak RSS** — max over time of the summed RSS of the process tree (psutil, sampled
  every 0.1 s), or the largest single-process max RSS (wait4), whichever is larger.
  Summed RSS counts pages shared between processes more than once. Spark's figure
  is mostly the driver JVM's heap (`spark.driver.memory` 6g lets it grow lazily).
* **RMSE** — train RMSE on the training ratings, test RMSE on the warm test ratings
  (user and item both have a training rating), the split being the pipeline's stable
  hash (split_seed 0, 10 %). WALS methods use the project defaults (λ 0.07,
  w0 0.01, linear weights 130) — a different objective from Spark's explicit ALS
  (λ 0.1, scaled by counts), so compare RMSEs within WALS methods, and the
  wals_core/pipeline pair for equality (same kernel, same split, same init). implicit
  optimises an implicit-feedback objective: no RMSE.
* **numpy floor** — per iteration, only the kernels an exact ALS in numpy/scipy
  cannot avoid even if every per-row Gramian were free: the right-hand sides
  `A @ V`, `Aᵀ @ U` (scipy CSR × dense) and one batched `np.linalg.solve` of all
  (users + items) k×k systems. Building the per-row weighted Gramians
  (nnz·k²/2 multiply-adds per side) is what the real solvers spend most time on; it
  is excluded, so this is a lower bound, not a target.
* **Threads** — implicit `num_threads=2` with BLAS pinned to 1 thread
  (`threadpool_limits(1, 'blas')`, as implicit asks); Spark `local[2]`, driver memory
  6g, `spark.sql.shuffle.partitions` 8; Beam multi_processing 2 workers; the
  project's solve kernel (Beam, wals_core) runs 2 Python threads with BLAS pinned
  to 1 thread; numpy floor uses numpy's default BLAS threads (see versions).
* **Allocator** — the Beam command line raises glibc's mmap/trim thresholds
  (`pipeline/runners/memory_tuning.py`); the wals_core case applies the same setting, so
  the pipeline-vs-wals_core ratio compares like with like. Peers run as shipped.
* **Peers read a pre-split file** (`output/bench-data/NAME.split.tsv`: dense indices,
  rating, test flag), so they do not pay for the ID hashing/split; the pipeline and
  wals_core read the raw `u.data` file and compute the split themselves.

### Noise

The machine has 2 cores and is shared: other engineers' tests and benchmarks run at
the same time. The `load avg` column is the 1-minute load average before→after each
case; a load above 2 means the case competed for the CPUs, and its wall times (all
of the above except CPU s) are inflated — CPU s is the less noise-sensitive figure.
Ratios come from the same run but not from the same moment, so a ratio between
cases with very different load is unreliable; re-run the two cases back to back
(`--sizes 10m --methods beam_inmem@10,spark`) before acting on a close call.
"""


def _code_line(info) -> str:
    code = info.get('code')
    if not code:
        return '* Code under test: not recorded (run predates code snapshots)'
    dirty = code.get('uncommitted') or []
    return (f'* Code under test: git {code.get("head", "?")}'
            + (f' plus uncommitted changes to {", ".join(dirty)}' if dirty else '')
            + f'; every case imported one snapshot of pipeline/ and wals_core/ taken at the '
            f'start of the run (sha256 {code["sha256"]}; wals_core/solve.py '
            f'{code["files"].get("wals_core/solve.py", "?")})')


def _run_notes(work) -> list[str]:
    notes = (ROOT / work / 'notes.md') if not pathlib.Path(work).is_absolute() \
        else pathlib.Path(work) / 'notes.md'
    if notes.exists():
        return ['## Notes on this run', '', notes.read_text().strip(), '']
    return []


_SECTION = re.compile(r'<!-- section (\S+) -->\n.*?<!-- /section \1 -->\n', re.S)


def marked_section(name: str, text: str) -> str:
    """text between the markers that write_section and write_report look for."""
    return f'<!-- section {name} -->\n{text.rstrip()}\n<!-- /section {name} -->\n'


def write_section(path: pathlib.Path, name: str, text: str) -> None:
    """Puts a marked section into the report at `path`: in place of the section of
    that name if there is one, else at the end; the rest of the file is kept."""
    block = marked_section(name, text)
    old = path.read_text() if path.exists() else ''
    for m in _SECTION.finditer(old):
        if m.group(1) == name:
            path.write_text(old[:m.start()] + block + old[m.end():])
            return
    path.write_text(old.rstrip('\n') + ('\n\n' if old.strip() else '') + block)


def _kept_sections(path: pathlib.Path) -> list[str]:
    """The marked sections other scripts wrote into the report (run_quality.py's)."""
    if not path.exists():
        return []
    return [m.group(0) for m in _SECTION.finditer(path.read_text())]


def write_report(path: pathlib.Path, results, info, argv, started, finished, sizes, work):
    lines = [
        '# Benchmarks', '',
        f'Produced by `bench/run_bench.py` on {started:%Y-%m-%d %H:%M} UTC '
        f'({(finished - started).total_seconds() / 60:.0f} min). Everything below, '
        'ratios included, comes from this one run.', '',
        '```', 'bench/setup_env.sh',
        shlex.join(['bench/.venv/bin/python', 'bench/run_bench.py'] + argv), '```', '',
        '## Machine and versions', '',
        f'* {info["nproc"]} CPUs: {info["cpu"]}; {info["memory_gib"]:.1f} GiB memory; '
        f'Linux {info["kernel"]}; load average at start/end: '
        f'{info["load_start"]:.1f} / {info["load_end"]:.1f} (1 min)',
        '* ' + ', '.join(f'{k} {v}' for k, v in info['versions'].items() if k != 'blas'),
        f'* BLAS: {info["versions"].get("blas", "?")}',
        _code_line(info), '',
        '## Data', '',
        _table(['name', 'source', 'ratings', 'users', 'items', 'test ratings'],
               datasets_rows(sizes)), '',
        '## Targets', '',
        _table(['#', 'what', 'measured', 'target', 'verdict'], targets(results)), '',
        '## Results', '',
        _table(RESULT_HEADER, result_rows(results)), '',
        '## Same split, same model: pipeline vs wals_core RMSE', '',
        _table(['data', 'pair', 'k', 'train RMSE (beam / wals_core)',
                'test RMSE (beam / wals_core)', 'agree (< 1e-4)'], consistency_rows(results)),
        '',
        '## Phases and per-iteration times (seconds)', '',
        _table(['data', 'method', 'k', 'phases', 'per iteration', 's/iter is'],
               phase_rows(results)), '',
        '## Growth with data size (goal 6: memory)', '',
        _table(['case', '1m', '10m', '20m'], growth_rows(results)) or '(no 1m/10m/20m cases)', '',
        *_run_notes(work),
        '## Method', '', NOTES,
        f'Raw per-case results (JSON, logs, models) of this run: `{work}`'
        ' (under output/, not committed).', '',
    ]
    lines += _kept_sections(path)
    path.write_text('\n'.join(lines))


def rewrite_report(args) -> int:
    work = args.from_results
    results = json.loads((work / 'results.json').read_text())
    run_file = work / 'run.json'
    if run_file.exists():
        run = json.loads(run_file.read_text())
        argv, info, sizes = run['argv'], run['info'], run['sizes']
        started = datetime.datetime.fromisoformat(run['started'])
        finished = datetime.datetime.fromisoformat(run['finished'])
    else:   # a run that predates run.json: rebuild what it would have held
        argv = json.loads(args.argv_json) if args.argv_json else ['bench/run_bench.py']
        info = machine_info(args.python)
        info['load_start'] = results[0]['load_before']
        info['load_end'] = results[-1]['load_after']
        sizes = list(dict.fromkeys(r['size'] for r in results))
        started = datetime.datetime.fromtimestamp(results[0]['spawn'], datetime.timezone.utc)
        last = results[-1]
        finished = datetime.datetime.fromtimestamp(last['spawn'] + last['process_wall'],
                                                   datetime.timezone.utc)
    write_report(args.out, results, info, argv, started, finished, sizes,
                 work.relative_to(ROOT) if work.is_relative_to(ROOT) else work)
    print(_table(['#', 'what', 'measured', 'target', 'verdict'], targets(results)))
    print(f'[bench] wrote {args.out} from {work}')
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 epilog=__doc__.split('\n\n', 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sizes', default='100k,1m,10m',
                    help=f'comma list of {",".join(ALL_SIZES)} (default 100k,1m,10m)')
    ap.add_argument('--methods', default=None,
                    help='comma list of methods or method@rank (default: all, default ranks)')
    ap.add_argument('--also', default='',
                    help='extra cases after the plan, SIZE:METHOD@RANK comma list, e.g. '
                         '20m:beam_inmem@32 (the memory goal) in the same run')
    ap.add_argument('--quick', action='store_true', help='smoke run: sizes 100k,1m only')
    ap.add_argument('--iters', type=int, default=ITERS, help='iterations per case (default 10)')
    ap.add_argument('--case_iters', default='',
                    help='per-case iterations, e.g. wals_core@32=3 (reported in the table)')
    ap.add_argument('--timeout', type=float, default=2400, help='seconds per case (default 2400)')
    ap.add_argument('--out', type=pathlib.Path, default=ROOT / 'BENCHMARKS.md')
    ap.add_argument('--work', type=pathlib.Path, default=None,
                    help='folder for per-case results (default output/bench-runs/STAMP)')
    ap.add_argument('--from_results', type=pathlib.Path, default=None,
                    help='only re-write the report from a finished run folder (its '
                         'results.json); nothing is run')
    ap.add_argument('--argv_json', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--python', default=sys.executable,
                    help='interpreter of the cases (default: this one, bench/.venv)')
    args = ap.parse_args(argv)

    sizes = ['100k', '1m'] if args.quick else [s for s in args.sizes.split(',') if s]
    for s in sizes:
        if s not in ALL_SIZES:
            ap.error(f'unknown size {s!r}')
    methods = [m for m in (args.methods or '').split(',') if m] or None
    case_iters = {}
    for item in filter(None, args.case_iters.split(',')):
        key, _, n = item.partition('=')
        case_iters[key] = int(n)
    if args.from_results:
        return rewrite_report(args)
    cases = plan(sizes, methods, args.iters, case_iters)
    for item in filter(None, args.also.split(',')):
        size, _, method = item.partition(':')
        if size not in ALL_SIZES or not method:
            ap.error(f'--also: {item!r} is not SIZE:METHOD@RANK')
        cases += plan([size], [method], args.iters, case_iters)
        if size not in sizes:
            sizes.append(size)
    started = datetime.datetime.now(datetime.timezone.utc)
    work = args.work or ROOT / 'output' / 'bench-runs' / started.strftime('%Y%m%d-%H%M%S')
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.python)
    info['load_start'] = os.getloadavg()[0]
    info['code'] = snapshot_code(work)
    code_root = pathlib.Path(info['code']['root'])
    print(f'[bench] {len(cases)} cases, results in {work}; code snapshot '
          f'{info["code"]["sha256"]} in {code_root}', flush=True)

    for s in sizes:   # data once, in its own process (the generator's memory is not ours)
        subprocess.run([args.python, str(BENCH / 'prepare_data.py'), s], cwd=ROOT, check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))

    results = []
    for case in cases:
        print(f'[bench] {case["id"]} ({case["iters"]} it) ...', end=' ', flush=True)
        r = run_case(case, args.python, work, args.timeout, code_root)
        results.append(r)
        (work / 'results.json').write_text(json.dumps(results, indent=2, default=str))
        print(f'{r["status"]}: s/iter {_f(r.get("seconds_per_iteration"), 3)}, '
              f'read→model {_f(r.get("read_to_model"), 1)} s, wall {r["process_wall"]:.1f} s, '
              f'peak {_gib(r["peak_rss"])} GiB, load {r["load_before"]:.1f}', flush=True)
    info['load_end'] = os.getloadavg()[0]
    finished = datetime.datetime.now(datetime.timezone.utc)
    (work / 'run.json').write_text(json.dumps(
        {'argv': argv, 'info': info, 'started': started.isoformat(),
         'finished': finished.isoformat(), 'sizes': sizes}, indent=2))
    write_report(args.out, results, info, argv, started, finished, sizes,
                 work.relative_to(ROOT) if work.is_relative_to(ROOT) else work)
    print()
    print(_table(RESULT_HEADER, result_rows(results)))
    print()
    print(_table(['#', 'what', 'measured', 'target', 'verdict'], targets(results)))
    print(f'\n[bench] wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

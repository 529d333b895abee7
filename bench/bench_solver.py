"""Half-step solver benchmark (issue 22, parts 1 and 4): the exact and the
conjugate-gradient solver of wals_core, per --model, against `implicit`'s ALS, in
one run: speed on the 10m synthetic set and quality on MovieLens 100k and 10m.

    bench/setup_env.sh                                   # once: bench/.venv (implicit)
    bench/.venv/bin/python bench/bench_solver.py         # ~15 min on 2 idle cores
    bench/.venv/bin/python bench/bench_solver.py --quick # 100k only, smoke test

Speed (--speed_data, default 10m; --ranks, default 32,10): seconds per iteration
(all rows, then all columns) of the in-memory core (wals_core.train's solve_side:
objectives.make_solver + RowSolver.solve, the kernel the Beam pipeline runs per
block, here on one block per side) for every --model (each mode's command-line
defaults, latent_factors set to the rank) with solver 'exact' and 'cg' (3 steps,
warm-started from the previous factors), and `implicit` 0.7 AlternatingLeastSquares
(exact Cholesky, use_cg=False; and its default CG, 3 steps) on the same training
ratings (confidence 1 + log1p(r), as bench/quality_workers.py). The median of
--iters timed iterations; the core's first iteration (which makes the RowSolver
plans) is not timed. Also per mode: the per-iteration objective
(objectives.block_objective over the whole matrix as one block), with its
ObjectiveTerms made in the call and passed in (they were per-block caches when
results/solver.md was written; now they work slice by slice, so both columns time
the same work).

Beam (--beam_data, default 10m; --beam_models, default wals,implicit; --beam_rank,
default 32): the whole pipeline, python -m pipeline.train on the DirectRunner
(in_memory) with --solver exact and cg, --beam_iters iterations; s/iter and the
solve's share from its metrics.json (phase_seconds.per_iteration and
solve_per_iteration, the median after the first iteration), next to the core and
`implicit` of the same run, with its test metrics (CG vs exact).

Quality (--quality_data, default 100k,10m): every mode with its command-line
defaults (pipeline/options.py) trained by the in-memory trainer with the exact and
the CG solver from the same initial factors; precision@10 and NDCG@10 (every warm
test rating relevant) and test RMSE (wals, explicit) by bench/quality_eval.py.

Threads: 2 on each side (the machine has 2 cores). wals_core: RowSolver on 2
Python threads, numpy's BLAS single-threaded during solves (solve.py does that);
`implicit`: num_threads=2 (its OpenMP loop), BLAS limited to 1 thread as it asks.
Every case runs in its own process, one at a time. Heavy: run it under `nice` on a
shared machine; there, compare the ratios of one run, not absolute seconds.

Prints the tables and writes bench/results/solver.md (date, commit, machine,
command). Data: bench/prepare_data.py's cache (output/bench-data/, git-ignored).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / 'bench'
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from prepare_data import DEFAULT_CACHE, cpu_model, paths, prepare, read_ratings  # noqa: E402

RESULT = BENCH / 'results' / 'solver.md'
THREADS = 2
CG_STEPS = 3
MODELS = ('wals', 'implicit', 'explicit')
RANK_K = 10            # precision@10, NDCG@10
QUALITY_TOLERANCE = 0.01
SPEED_GOAL = 1.0       # core CG s/iter <= 1.0x implicit's CG at k=32
MODEL_GOAL = 1.1       # implicit, explicit s/iter <= 1.1x wals at the same k


# ---------------------------------------------------------------------------------
# Data: the benchmark split, cached as .npz next to prepare_data's files
# ---------------------------------------------------------------------------------

def load_split(name: str) -> dict:
    """Training/test triples of NAME (quality_eval.Split: duplicates merged by mean)
    and the sorted user/item IDs (for the per-ID initial factors)."""
    cache = DEFAULT_CACHE / f'{name}.solverbench.npz'
    meta = paths(name)['meta']
    if cache.exists() and cache.stat().st_mtime > meta.stat().st_mtime:
        with np.load(cache) as z:
            return {key: z[key] for key in z.files}
    import quality_eval as qe
    s = qe.Split.load(name)
    users, items, _ = read_ratings(paths(name)['raw'])
    out = dict(n_users=np.int64(s.n_users), n_items=np.int64(s.n_items),
               train_u=s.train_u, train_i=s.train_i, train_r=s.train_r,
               test_u=s.test_u, test_i=s.test_i, test_r=s.test_r,
               user_ids=np.unique(users), item_ids=np.unique(items))
    tmp = cache.with_suffix('.tmp.npz')
    np.savez(tmp, **out)
    os.replace(tmp, cache)
    return out


def split_of(d: dict):
    import quality_eval as qe
    return qe.Split(int(d['n_users']), int(d['n_items']), d['train_u'], d['train_i'],
                    d['train_r'], d['test_u'], d['test_i'], d['test_r'])


def mode_params(model: str, solver: str, rank: int | None = None, iters: int | None = None):
    """WalsParams of a mode with the command line's defaults (wals_core/defaults.py)."""
    from wals_core.defaults import model_defaults
    from wals_core.params import WalsParams
    kw = dict(model_defaults(model), solver=solver, cg_steps=CG_STEPS)   # ratings: linear
    if rank:
        kw['latent_factors'] = rank
    if iters:
        kw['num_iters'] = iters
    return WalsParams(**kw)


def initial(d: dict, p, seed: int = 0):
    from wals_core.init import initial_factors
    from wals_core.train import initial_state
    from wals_core.vocab import Vocabulary
    k = p.latent_factors
    return initial_state(initial_factors(Vocabulary(d['user_ids']).hashes, k, seed, 'row'),
                         initial_factors(Vocabulary(d['item_ids']).hashes, k, seed, 'col'), p)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------
# Workers (one per process)
# ---------------------------------------------------------------------------------

def worker_core_speed(case: dict) -> dict:
    """s/iter of the in-memory core for one mode, solver and rank."""
    from wals_core import objectives
    from wals_core.solve import gramian
    from wals_core.train import Problem
    d = load_split(case['data'])
    p = mode_params(case['model'], case['solver'], case['rank'])
    nu, ni = int(d['n_users']), int(d['n_items'])
    problem = Problem.build(d['train_u'], d['train_i'], d['train_r'], nu, ni, p)
    u, v = initial(d, p)
    solvers = {side: objectives.make_solver(
        problem.by_row if side == 'row' else problem.by_col, side, p, problem.col_counts, 0,
        ni if side == 'row' else nu, problem.global_mean, num_threads=case['threads'])
        for side in ('row', 'col')}

    def half(side, other, own):
        factors, offsets = objectives.solve_inputs(other, p)
        return solvers[side].solve(factors, gramian(other), other_offsets=offsets,
                                   x0=own).astype(np.float32)

    times, cpus = [], []
    for it in range(case['iters'] + 1):          # the first one makes the plans
        t0, c0 = time.perf_counter(), cpu_seconds()
        u = half('row', v, u if it else None)      # as wals_core.train: iteration 0
        v = half('col', u, v if it else None)      # starts from 0
        times.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    out = {'per_iteration': times[1:], 'first_iteration': times[0],
           'seconds_per_iteration': statistics.median(times[1:]),
           'cpu_per_iteration': statistics.median(cpus[1:]),
           'plan_mib': sum(s.plan_nbytes for s in solvers.values()) / 2 ** 20,
           'objective': objectives.objective(problem.by_row, problem.col_counts, u, v, p,
                                             problem.global_mean)}
    if case.get('objective_timing'):
        terms = objectives.ObjectiveTerms(problem.by_row, p, problem.col_counts)

        def timed(**kw):
            best = []
            for _ in range(3):
                t0 = time.perf_counter()
                value = objectives.block_objective(problem.by_row, 0, u, v, p,
                                                   problem.col_counts, problem.global_mean,
                                                   **kw)
                best.append(time.perf_counter() - t0)
            return statistics.median(best), value
        plain, a = timed()
        cached, b = timed(terms=terms)
        out.update(objective_uncached=plain, objective_cached=cached,
                   objective_same_bits=a == b)
    return out


def worker_models_interleaved(case: dict) -> dict:
    """Per mode, the CPU seconds of one iteration on one thread, the three modes'
    iterations interleaved in one process (round after round, best of the rounds):
    on a busy machine a far steadier ratio between modes than wall times taken in
    separate processes minutes apart."""
    from wals_core import objectives
    from wals_core.solve import gramian
    from wals_core.train import Problem
    d = load_split(case['data'])
    nu, ni = int(d['n_users']), int(d['n_items'])
    state = {}
    for m in MODELS:
        p = mode_params(m, case['solver'], case['rank'])
        problem = Problem.build(d['train_u'], d['train_i'], d['train_r'], nu, ni, p)
        solvers = {side: objectives.make_solver(
            problem.by_row if side == 'row' else problem.by_col, side, p,
            problem.col_counts, 0, ni if side == 'row' else nu, problem.global_mean,
            num_threads=1) for side in ('row', 'col')}
        state[m] = [p, solvers, *initial(d, p)]

    def iteration(m: str, first: bool = False) -> float:
        p, solvers, u, v = state[m]
        t0 = time.thread_time()
        for side in ('row', 'col'):
            other, own = (v, u) if side == 'row' else (u, v)
            factors, offsets = objectives.solve_inputs(other, p)
            x = solvers[side].solve(factors, gramian(other), other_offsets=offsets,
                                    x0=None if first else own).astype(np.float32)
            u, v = (x, v) if side == 'row' else (u, x)
        state[m][2:] = [u, v]
        return time.thread_time() - t0

    for m in MODELS:
        iteration(m, first=True)                     # plans
    cpu = {m: [] for m in MODELS}
    for _ in range(case['iters']):
        for m in MODELS:
            cpu[m].append(iteration(m))
    return {'cpu_per_iteration': {m: min(t) for m, t in cpu.items()}, 'cpu_all': cpu}


def worker_implicit_speed(case: dict) -> dict:
    """s/iter of `implicit`'s ALS (exact or CG) on the same training ratings."""
    import scipy.sparse
    import implicit
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits
    d = load_split(case['data'])
    conf = np.log1p(d['train_r']).astype(np.float32)      # C = 1 + alpha log1p(r)
    user_items = scipy.sparse.csr_matrix((conf, (d['train_u'], d['train_i'])),
                                         shape=(int(d['n_users']), int(d['n_items'])))
    per_iter = []
    model = AlternatingLeastSquares(factors=case['rank'], iterations=case['iters'] + 1,
                                    use_cg=case['solver'] == 'cg', alpha=1.0,
                                    num_threads=case['threads'],
                                    calculate_training_loss=False, random_state=0)
    c0 = cpu_seconds()
    with threadpool_limits(1, 'blas'):               # as implicit asks
        model.fit(user_items, show_progress=False,
                  callback=lambda it, elapsed, loss: per_iter.append(elapsed))
    timed = per_iter[1:]                              # as the core: first one not timed
    return {'per_iteration': timed, 'first_iteration': per_iter[0],
            'seconds_per_iteration': statistics.median(timed),
            'cpu_per_iteration': (cpu_seconds() - c0) / len(per_iter),
            'version': implicit.__version__, 'cg_steps': model.cg_steps}


def worker_quality(case: dict) -> dict:
    """Train one mode (its CLI defaults) with one solver; ranking and RMSE."""
    import quality_eval as qe
    from wals_core import objectives
    from wals_core.train import Problem, train
    d = load_split(case['data'])
    split = split_of(d)
    p = mode_params(case['model'], case['solver'])
    problem = Problem.build(split.train_u, split.train_i, split.train_r, split.n_users,
                            split.n_items, p)
    u0, v0 = initial(d, p, case.get('seed', 0))
    stamps = [time.perf_counter()]
    u, v = train(problem, p, u0, v0, lambda it, side, u, v: stamps.append(
        time.perf_counter()) if side == 'col' else None)
    uf, ub = objectives.split_bias(u, p)
    vf, vb = objectives.split_bias(v, p)
    mu = problem.global_mean if objectives.has_bias(p) else 0.0
    out = {'params': p.as_dict(), 'seconds_per_iteration': statistics.median(np.diff(stamps)),
           'ranking': qe.ranking(split, uf, vf, RANK_K, 0.0, vb),
           'objective': objectives.objective(problem.by_row, problem.col_counts, u, v, p,
                                             problem.global_mean)}
    if p.model != 'implicit':
        out['rmse'] = qe.rmse(split, qe.dot_predictor(uf, vf, mu, ub, vb))
    return out


def worker_beam_speed(case: dict) -> dict:
    """The Beam pipeline (python -m pipeline.train, DirectRunner in_memory) on the
    raw ratings with one mode, solver and rank: s/iter and solve s/iter from its
    metrics.json (phase_seconds.per_iteration, solve_per_iteration; the median of
    the iterations after the first, which makes the plans), and its test metrics."""
    import shutil
    import tempfile
    out = pathlib.Path(tempfile.mkdtemp(prefix='beam-', dir=ROOT / 'output')) / 'run'
    cmd = [sys.executable, '-m', 'pipeline.train', '--input', str(paths(case['data'])['raw']),
           '--output', str(out), '--model', case['model'],
           '--latent_factors', str(case['rank']), '--num_iters', str(case['iters']),
           '--solver', case['solver'], '--cg_steps', str(CG_STEPS),
           '--runner', 'DirectRunner', '--direct_running_mode', 'in_memory']
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f'exit {proc.returncode}: {proc.stderr[-2000:]}')
        m = json.loads((out / 'metrics.json').read_text())
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    ps = m['phase_seconds']
    per, solve = ps['per_iteration'], ps['solve_per_iteration']
    return {'per_iteration': per[1:], 'first_iteration': per[0],
            'seconds_per_iteration': statistics.median(per[1:]),
            'solve_per_iteration': statistics.median(solve[1:]),
            'read_and_group': ps.get('read_and_group'),
            'evaluate_and_write': ps.get('evaluate_and_write'),
            'ranking': {'precision_at_k': m.get('precision_at_k'),
                        'ndcg_at_k': m.get('ndcg_at_k')},
            'test_rmse': m.get('test_rmse'),
            'objective': (m.get('history') or [{}])[-1].get('objective')}


WORKERS = {'core_speed': worker_core_speed, 'implicit_speed': worker_implicit_speed,
           'models_interleaved': worker_models_interleaved, 'quality': worker_quality,
           'beam_speed': worker_beam_speed}


# ---------------------------------------------------------------------------------
# Plan, run, report
# ---------------------------------------------------------------------------------

def plan(args) -> list[dict]:
    cases = []
    for rnd in range(1, args.rounds + 1):
        cases += [dict(c, round=rnd) for c in _speed_plan(args)]
    for data in args.beam_data:
        for model in args.beam_models:
            for solver in ('exact', 'cg'):
                cases.append(dict(kind='beam_speed', data=data, rank=args.beam_rank,
                                  model=model, solver=solver, iters=args.beam_iters))
    for data in args.speed_data:
        for rank in args.ranks:
            for solver in ('exact', 'cg'):
                cases.append(dict(kind='models_interleaved', data=data, rank=rank,
                                  model='all', solver=solver, iters=args.iters))
    for data in args.quality_data:
        for model in MODELS:
            for solver in ('exact', 'cg'):
                cases.append(dict(kind='quality', data=data, model=model, solver=solver))
            # The metrics' own noise: the exact solver from other initial factors.
            cases.append(dict(kind='quality', data=data, model=model, solver='exact',
                              seed=1))
    return cases


def _speed_plan(args) -> list[dict]:
    cases = []
    for data in args.speed_data:
        for rank in args.ranks:
            for model in MODELS:
                for solver in ('exact', 'cg'):
                    cases.append(dict(kind='core_speed', data=data, rank=rank, model=model,
                                      solver=solver, iters=args.iters, threads=args.threads,
                                      objective_timing=solver == 'exact'))
            for solver in ('exact', 'cg'):
                cases.append(dict(kind='implicit_speed', data=data, rank=rank,
                                  model='implicit-lib', solver=solver, iters=args.iters,
                                  threads=args.threads))
    return cases


def run_case(case: dict, work: pathlib.Path) -> dict:
    """One case in its own process (this script with --worker); its JSON result."""
    name = '-'.join(str(case[k]) for k in ('kind', 'data', 'model', 'solver')
                    if k in case) + (f'-k{case["rank"]}' if 'rank' in case else '') \
        + (f'-seed{case["seed"]}' if case.get('seed') else '') \
        + (f'-round{case["round"]}' if case.get('round') else '')
    out = work / f'{name}.json'
    load = os.getloadavg()[0]
    started = time.time()
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), '--worker',
                           json.dumps(case), '--result', str(out)],
                          cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.time() - started
    if proc.returncode != 0:
        tail = '\n'.join(proc.stderr.strip().splitlines()[-5:])
        print(f'[solver-bench] {name} failed:\n{tail}', file=sys.stderr, flush=True)
        return dict(case, error=tail, wall=wall, load=load)
    res = dict(case, **json.loads(out.read_text()), wall=wall, load=load)
    print(f'[solver-bench] {name}: {_summary(res)} (wall {wall:.0f} s, load {load:.1f})',
          flush=True)
    return res


def _summary(r: dict) -> str:
    if r['kind'] == 'models_interleaved':
        return ' '.join(f'{m} {t:.3f}' for m, t in r['cpu_per_iteration'].items()) + \
            ' CPU s/iter'
    if r['kind'] == 'beam_speed':
        return (f"{r['seconds_per_iteration']:.3f} s/iter (solve "
                f"{r['solve_per_iteration']:.3f}), NDCG@10 {_f(r['ranking']['ndcg_at_k'], '{:.4f}')}")
    if r['kind'] == 'quality':
        rk = r['ranking']
        rm = r.get('rmse', {}).get('test_rmse')
        return (f"P@10 {rk['precision_at_k']:.4f} NDCG@10 {rk['ndcg_at_k']:.4f}"
                + (f' RMSE {rm:.4f}' if rm is not None else ''))
    return f"{r['seconds_per_iteration']:.3f} s/iter"


def _f(x, fmt='{:.3f}') -> str:
    return '—' if x is None else fmt.format(x)


def _ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


def report(results: list[dict], args, started: datetime.datetime) -> str:
    ok = [r for r in results if 'error' not in r]
    speed: dict[tuple, dict] = {}      # per case the round with the lowest median
    for r in ok:
        if r['kind'] in ('core_speed', 'implicit_speed'):
            key = (r['data'], r['rank'], r['model'], r['solver'])
            if key not in speed or r['seconds_per_iteration'] < \
                    speed[key]['seconds_per_iteration']:
                speed[key] = r
    quality = {(r['data'], r['model'], r['solver'] + (f"-seed{r['seed']}" if r.get('seed')
                                                      else '')): r
               for r in ok if r['kind'] == 'quality'}
    lines = []
    goals = []

    def sp(data, rank, model, solver):
        r = speed.get((data, rank, model, solver))
        return None if r is None else r['seconds_per_iteration']

    for data in args.speed_data:
        lines += [f'### Speed: seconds per iteration, {data}', '',
                  '| k | method | s/iter | best it. | CPU s/iter | vs `implicit` CG | '
                  'vs `implicit` exact | vs same mode exact |',
                  '|---|---|---|---|---|---|---|---|']
        for rank in args.ranks:
            icg, iex = sp(data, rank, 'implicit-lib', 'cg'), sp(data, rank, 'implicit-lib', 'exact')
            rows = [('implicit-lib', 'exact', '`implicit` exact Cholesky'),
                    ('implicit-lib', 'cg', f'`implicit` CG ({CG_STEPS} steps)')]
            rows += [(m, s, f'wals_core `--model {m}` {s}' + (f' ({CG_STEPS} steps)'
                                                              if s == 'cg' else ''))
                     for m in MODELS for s in ('exact', 'cg')]
            for model, solver, label in rows:
                r = speed.get((data, rank, model, solver))
                if r is None:
                    continue
                s = r['seconds_per_iteration']
                same = None if model == 'implicit-lib' else _ratio(s, sp(data, rank, model,
                                                                        'exact'))
                lines.append(f"| {rank} | {label} | {s:.3f} | {min(r['per_iteration']):.3f} "
                             f"| {_f(r.get('cpu_per_iteration'))} "
                             f"| {_f(_ratio(s, icg), '{:.2f}×')} | {_f(_ratio(s, iex), '{:.2f}×')} "
                             f"| {_f(same, '{:.2f}×')} |")
            if rank == 32:
                for m in MODELS:
                    ratio = _ratio(sp(data, rank, m, 'cg'), icg)
                    if ratio is not None:
                        goals.append((f'{data} k=32: wals_core CG `--model {m}` ≤ '
                                      f'{SPEED_GOAL:.1f}× `implicit` CG', ratio <= SPEED_GOAL,
                                      f'{ratio:.2f}×'))
        inter = {(r['rank'], r['solver']): r['cpu_per_iteration'] for r in ok
                 if r['kind'] == 'models_interleaved' and r['data'] == data}
        lines += ['', f'### Every model equally fast: s/iter relative to `--model wals`, '
                  f'{data}', '',
                  'Wall: the speed cases above (2 threads, separate processes). CPU, '
                  'interleaved: one process holding all three modes, one thread, their '
                  'iterations in turn, the best of ' + str(args.iters) + ' rounds of thread '
                  'CPU seconds (the goal is judged on this steadier one).', '',
                  '| k | solver | wall: wals | implicit | explicit | implicit / wals | '
                  'explicit / wals | CPU interleaved: wals | implicit | explicit | '
                  'implicit / wals | explicit / wals |',
                  '|---|---|---|---|---|---|---|---|---|---|---|---|']
        for rank in args.ranks:
            for solver in ('exact', 'cg'):
                w, i, e = (sp(data, rank, m, solver) for m in MODELS)
                c = inter.get((rank, solver), {})
                cw, ci, ce = (c.get(m) for m in MODELS)
                lines.append(f'| {rank} | {solver} | {_f(w)} | {_f(i)} | {_f(e)} | '
                             f"{_f(_ratio(i, w), '{:.2f}×')} | {_f(_ratio(e, w), '{:.2f}×')} | "
                             f'{_f(cw)} | {_f(ci)} | {_f(ce)} | '
                             f"{_f(_ratio(ci, cw), '{:.2f}×')} | {_f(_ratio(ce, cw), '{:.2f}×')} |")
                for m, ratio, wall in (('implicit', _ratio(ci, cw), _ratio(i, w)),
                                       ('explicit', _ratio(ce, cw), _ratio(e, w))):
                    if ratio is not None:
                        goals.append((f'{data} k={rank} {solver}: `--model {m}` ≤ '
                                      f'{MODEL_GOAL}× `--model wals` (CPU, interleaved)',
                                      ratio <= MODEL_GOAL,
                                      f"{ratio:.2f}× (wall {_f(wall, '{:.2f}×')})"))
        lines += ['', f'### Objective per iteration (block_objective, whole matrix as one '
                  f'block), {data}', '',
                  '| k | mode | uncached s | with ObjectiveTerms s | same bits |',
                  '|---|---|---|---|---|']
        for rank in args.ranks:
            for m in MODELS:
                r = speed.get((data, rank, m, 'exact'))
                if r and 'objective_uncached' in r:
                    lines.append(f"| {rank} | {m} | {r['objective_uncached']:.3f} | "
                                 f"{r['objective_cached']:.3f} | "
                                 f"{'yes' if r['objective_same_bits'] else 'NO'} |")
        lines.append('')
    beam = {(r['data'], r['model'], r['solver']): r for r in ok if r['kind'] == 'beam_speed'}
    for data in args.beam_data:
        rank = args.beam_rank
        icg = sp(data, rank, 'implicit-lib', 'cg')
        lines += [f'### Beam pipeline (DirectRunner in_memory), {data}, k={rank}, '
                  f'{args.beam_iters} iterations', '',
                  'python -m pipeline.train --solver exact|cg on the raw ratings (its own '
                  'hashed 10% test split); s/iter and solve s/iter: medians of metrics.json '
                  'phase_seconds.per_iteration and solve_per_iteration after the first '
                  'iteration; "vs core": the in-memory core\'s s/iter of the same mode, '
                  'solver and k in this run; quality deltas: CG against the exact solver after '
                  'the same iterations.', '',
                  '| mode | solver | s/iter | solve s/iter | vs `implicit` CG | vs same mode '
                  'exact | vs core | P@10 | NDCG@10 | test RMSE | ΔP@10 | ΔNDCG@10 | ΔRMSE |',
                  '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
        for m in args.beam_models:
            ex = beam.get((data, m, 'exact'))
            for solver in ('exact', 'cg'):
                r = beam.get((data, m, solver))
                if r is None:
                    continue
                s_ = r['seconds_per_iteration']
                pk, nd, rm = r['ranking']['precision_at_k'], r['ranking']['ndcg_at_k'], \
                    r['test_rmse']
                deltas = ['', '', '']
                if solver == 'cg' and ex is not None:
                    rel = [_ratio(pk, ex['ranking']['precision_at_k']),
                           _ratio(nd, ex['ranking']['ndcg_at_k']), _ratio(rm, ex['test_rmse'])]
                    deltas = [_f(None if x is None else x - 1, '{:+.2%}') for x in rel]
                same = _ratio(s_, ex['seconds_per_iteration']) if ex else None
                lines.append(
                    f"| {m} | {solver} | {s_:.3f} | {r['solve_per_iteration']:.3f} | "
                    f"{_f(_ratio(s_, icg), '{:.2f}×')} | {_f(same, '{:.2f}×')} | "
                    f"{_f(_ratio(s_, sp(data, rank, m, solver)), '{:.2f}×')} | "
                    f"{_f(pk, '{:.4f}')} | {_f(nd, '{:.4f}')} | {_f(rm, '{:.4f}')} | "
                    + ' | '.join(deltas) + ' |')
        lines += ['', f'Command per case: `python -m pipeline.train --input <{data} ratings> '
                  f'--output <temporary folder> --model {{{",".join(args.beam_models)}}} '
                  f'--latent_factors {rank} --num_iters {args.beam_iters} --solver '
                  f'{{exact,cg}} --cg_steps {CG_STEPS} --runner DirectRunner '
                  '--direct_running_mode in_memory`', '']
    noise: dict[str, list[float]] = {}
    if args.quality_data:
        lines += ['### Quality: exact vs CG (each mode\'s command-line defaults)', '',
                  '| data | mode | solver | P@10 | NDCG@10 | test RMSE | s/iter | '
                  'ΔP@10 | ΔNDCG@10 | ΔRMSE |', '|---|---|---|---|---|---|---|---|---|---|']
        for data in args.quality_data:
            for m in MODELS:
                ex = quality.get((data, m, 'exact'))
                for solver in ('exact', 'cg', 'exact-seed1'):
                    r = quality.get((data, m, solver))
                    if r is None:
                        continue
                    pk, nd = r['ranking']['precision_at_k'], r['ranking']['ndcg_at_k']
                    rm = r.get('rmse', {}).get('test_rmse')
                    deltas = ['', '', '']
                    if solver != 'exact' and ex is not None:
                        d_p = _ratio(pk, ex['ranking']['precision_at_k'])
                        d_n = _ratio(nd, ex['ranking']['ndcg_at_k'])
                        d_r = _ratio(rm, ex.get('rmse', {}).get('test_rmse'))
                        deltas = [_f(None if x is None else x - 1, '{:+.2%}')
                                  for x in (d_p, d_n, d_r)]
                        if solver == 'exact-seed1':
                            noise.setdefault(data, []).extend(
                                abs(x - 1) for x in (d_p, d_n, d_r) if x is not None)
                        for label, x, better in (('P@10', d_p, 1), ('NDCG@10', d_n, 1),
                                                 ('RMSE', d_r, -1)):
                            if x is not None and solver == 'cg':
                                within = abs(x - 1) <= QUALITY_TOLERANCE
                                note = '' if within or better * (x - 1) < 0 else ' (better)'
                                goals.append((f'{data} `--model {m}` CG {label} within 1% '
                                              'of exact', within, f'{x - 1:+.2%}{note}'))
                    p = r['params']
                    label = 'exact, init seed 1' if solver == 'exact-seed1' else solver
                    lines.append(f"| {data} | {m} (k {p['latent_factors']}, "
                                 f"{p['num_iters']} it) | {label} | {pk:.4f} | {nd:.4f} | "
                                 f"{_f(rm, '{:.4f}')} | {r['seconds_per_iteration']:.3f} | "
                                 + ' | '.join(deltas) + ' |')
        lines.append('')
        for data, values in noise.items():
            goals.append((f'{data} (reference, no goal) largest |Δ| of the exact solver '
                          'from other initial factors', None, f'{max(values):.2%}'))
    failed = [r for r in results if 'error' in r]
    head = [
        '## Half-step solvers: exact and conjugate gradient, per model, against `implicit`',
        '',
        f'`{args.command}` — {started:%Y-%m-%d %H:%M}, commit {_commit()}, {_machine()}, '
        f'load {min(r["load"] for r in results):.1f}–{max(r["load"] for r in results):.1f} '
        f'at case starts, {_versions()}.',
        '',
        f'Threads: {args.threads} per side — wals_core: RowSolver on {args.threads} Python '
        'threads, numpy\'s BLAS single-threaded during solves; `implicit`: '
        f'num_threads={args.threads}, BLAS 1 thread. Every case in its own process. Speed: '
        f'median of {args.iters} timed iterations (the first iteration, which makes the '
        'plans, is not timed; for `implicit` its first callback time)'
        + (f', the lowest median of {args.rounds} rounds (all speed cases in turn, round '
           'after round)' if args.rounds > 1 else '') + '; "best it.": the fastest '
        'timed iteration; "CPU": process CPU seconds per iteration; each mode with its '
        'command-line defaults at the given k; `implicit` on confidence 1 + log1p(r); CG: '
        f'{CG_STEPS} steps, warm-started from the previous iteration\'s factors (iteration 0 '
        'from 0). Quality: the in-memory trainer from the same initial factors (seed 0), '
        'precision/NDCG@10 with every warm test rating relevant, test RMSE unclipped '
        '(bench/quality_eval.py); "exact, init seed 1" (the exact solver from other initial '
        'factors) shows how much the metrics move with no change of solver at all. On a '
        'shared machine the absolute seconds are noisy: compare the ratios of one run.',
        '',
        '### Goals', '', '| goal | met | value |', '|---|---|---|',
    ] + [f'| {g} | {"—" if ok_ is None else "yes" if ok_ else "**no**"} | {v} |'
         for g, ok_, v in goals] + ['']
    if failed:
        head += ['Failed cases: ' + ', '.join(f"{r['kind']} {r['data']} {r['model']} "
                                               f"{r['solver']}" for r in failed), '']
    return '\n'.join(head + lines)


def _commit() -> str:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--', 'wals_core', 'bench'],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out + (' (with uncommitted changes)' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def _machine() -> str:
    cpu = cpu_model(platform.processor() or 'unknown CPU')
    try:
        mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30
    except (ValueError, OSError):
        mem = float('nan')
    return f'{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()}'


def _versions() -> str:
    from threadpoolctl import threadpool_info
    out = [f'Python {platform.python_version()}', f'numpy {np.__version__}']
    try:
        import implicit
        out.append(f'implicit {implicit.__version__}')
    except ImportError:
        out.append('implicit missing')
    out += [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})"
            for i in threadpool_info() if i.get('user_api') == 'blas']
    return ', '.join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--speed_data', default='10m', help='data sets timed (comma list)')
    ap.add_argument('--quality_data', default='100k,10m', help='data sets scored')
    ap.add_argument('--ranks', default='32,10', help='k of the speed cases')
    ap.add_argument('--iters', type=int, default=5, help='timed iterations per speed case')
    ap.add_argument('--beam_data', default='10m',
                    help='data sets the Beam pipeline is timed on, exact vs cg (comma list; '
                         'empty: none)')
    ap.add_argument('--beam_models', default='wals,implicit', help='--model of the Beam cases')
    ap.add_argument('--beam_rank', type=int, default=32, help='k of the Beam cases')
    ap.add_argument('--beam_iters', type=int, default=6,
                    help='--num_iters of the Beam cases (the first is not timed)')
    ap.add_argument('--threads', type=int, default=THREADS)
    ap.add_argument('--rounds', type=int, default=1,
                    help='run the speed cases this many times in turn and keep each '
                         "case's lowest median (for a busy machine)")
    ap.add_argument('--quick', action='store_true',
                    help='smoke run: speed and quality on 100k only, 2 timed iterations')
    ap.add_argument('--out', type=pathlib.Path, default=RESULT)
    ap.add_argument('--worker', help=argparse.SUPPRESS)
    ap.add_argument('--result', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        case = json.loads(args.worker)
        pathlib.Path(args.result).write_text(json.dumps(WORKERS[case['kind']](case),
                                                        default=float))
        return 0
    if args.quick:
        args.speed_data, args.quality_data, args.iters = '100k', '100k', 2
        args.beam_data, args.beam_iters = '100k', 3
    split = lambda s: [x for x in s.split(',') if x]            # noqa: E731
    args.speed_data, args.quality_data = split(args.speed_data), split(args.quality_data)
    args.beam_data, args.beam_models = split(args.beam_data), split(args.beam_models)
    args.ranks = [int(x) for x in split(args.ranks)]
    args.command = 'python bench/bench_solver.py' + ''.join(
        f' {shlex.quote(a)}' for a in (sys.argv[1:] if argv is None else argv))
    started = datetime.datetime.now()
    for name in dict.fromkeys(args.speed_data + args.quality_data + args.beam_data):
        prepare(name)
        load_split(name)
    work = ROOT / 'output' / 'bench-solver' / started.strftime('%Y%m%d-%H%M%S')
    work.mkdir(parents=True, exist_ok=True)
    results = [run_case(case, work) for case in plan(args)]
    (work / 'results.json').write_text(json.dumps(results, indent=2, default=float))
    text = report(results, args, started)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + '\n')
    print(f'[solver-bench] wrote {args.out} (raw results: {work})', flush=True)
    return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())

"""Quality benchmark: every mode of the trainer against `implicit` ALS and Spark ALS.

    bench/setup_env.sh                                     # once: bench/.venv
    bench/.venv/bin/python bench/run_quality.py            # 100k and 10m -> BENCHMARKS.md
    bench/.venv/bin/python bench/run_quality.py --sizes 100k,1m --speed_sizes 1m  # dev run

One run, one split: every case trains on the same hashed 90/10 split of
bench/prepare_data.py (wals_core.hashing.is_test, split_seed 0) and is scored with
the project's own code (wals_core.topk.top_k + wals_core.ranking.ranking_sums, see
bench/quality_eval.py). Cases run one at a time, each in its own process, measured
by run_bench.run_process (wall, CPU, process-tree peak RSS, load).

Cases per data set (--sizes):
  wals, implicit, explicit   python -m pipeline.train --model M, the mode's defaults,
                             DirectRunner in_memory, --rank_k 10
                             --relevance_threshold 0; numbers from metrics.json, and
                             re-scored from model/ by quality_workers.py evaluate
                             (the "bench check" columns)
  implicit_als               `implicit` ALS, 32 factors, confidence 1 + log1p(r), 15 it
  spark_explicit             Spark ALS rank 10, regParam 0.1, 15 it (RMSE + ranking)
  spark_implicit             Spark ALS implicitPrefs, rank 32, alpha 1 on log1p(r), 15 it
Speed at the same k (--speed_sizes, default 10m): each mode at k=32, 10 iterations,
through the same CLI; s/iter relative to wals (the issue's bar: ≤ 1.3×).

--project inmem runs the modes with the in-memory trainer (quality_workers.py inmem)
instead of the CLI; `auto` (default) does that only when the CLI has no --model.
The report goes into BENCHMARKS.md as one marked section (the rest of the file is
kept); the raw JSON of every case into --work (default output/quality-runs/STAMP).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / 'bench'
sys.path.insert(0, str(BENCH))

from prepare_data import ALL_SIZES, paths  # noqa: E402
from run_bench import (_beam_result, _f, _gib, _table, _worker_result,  # noqa: E402
                       datasets_rows, machine_info, run_process, snapshot_code,
                       write_section)

MODES = ('wals', 'implicit', 'explicit')
PEERS = ('implicit_als', 'spark_explicit', 'spark_implicit')
SPEED_K, SPEED_ITERS = 32, 10
RANK_K = 10
SECTION = 'quality'
LABELS = {
    'wals': '`--model wals` (defaults: k 5, 20 it, λ 0.07, w0 0.01, linear weights 130)',
    'implicit': '`--model implicit` (defaults: k 32, 15 it, λ 0.1·n, alpha 1, log confidence)',
    'explicit': '`--model explicit` (defaults: k 10, 15 it, λ 0.1·n, biases)',
    'implicit_als': '`implicit` ALS 0.7.2 (32 factors, C = 1 + log1p(r), λ 0.01, CG, 15 it)',
    'spark_explicit': 'Spark ALS explicit (rank 10, regParam 0.1, 15 it)',
    'spark_implicit': 'Spark ALS implicitPrefs (rank 32, alpha 1 on log1p(r), regParam 0.1, '
                      '15 it)',
}


# ---------------------------------------------------------------------------------
# Plan and commands
# ---------------------------------------------------------------------------------

def plan(sizes: list[str], speed_sizes: list[str], methods: list[str] | None) -> list[dict]:
    cases = []
    for size in sizes:
        for m in MODES + PEERS:
            if not methods or m in methods:
                cases.append({'size': size, 'method': m, 'kind': 'quality',
                              'id': f'{size}-{m}'})
    for size in speed_sizes:
        for m in MODES:
            if not methods or m in methods or 'speed' in methods:
                cases.append({'size': size, 'method': m, 'kind': 'speed', 'rank': SPEED_K,
                              'iters': SPEED_ITERS, 'id': f'{size}-{m}-k{SPEED_K}'})
    return cases


def cli_supports_modes(py: str, code_root: pathlib.Path) -> bool:
    """Whether `python -m pipeline.train` of the code under test has --model."""
    out = subprocess.run([py, '-m', 'pipeline.train', '--help'], cwd=code_root,
                         capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(code_root)))
    return '--model' in out.stdout and '--relevance_threshold' in out.stdout


def command(case: dict, py: str, work: pathlib.Path, project: str) -> tuple[list[str], str]:
    """(argv, how the result is read: 'cli' or 'worker')."""
    out = work / case['id']
    m = case['method']
    if m in MODES and project == 'cli':
        cmd = [py, '-m', 'pipeline.train', '--input', str(paths(case['size'])['raw']),
               '--output', str(out), '--runner', 'DirectRunner',
               '--direct_running_mode', 'in_memory', '--model', m,
               '--rank_k', str(RANK_K), '--relevance_threshold', '0']
        if case['kind'] == 'speed':
            cmd += ['--latent_factors', str(case['rank']), '--num_iters', str(case['iters'])]
        return cmd, 'cli'
    cmd = [py, str(BENCH / 'quality_workers.py'), 'inmem' if m in MODES else m,
           '--data', case['size'], '--out', str(out), '--result', str(out / 'result.json'),
           '--rank_k', str(RANK_K)]
    if m in MODES:
        cmd += ['--model', m]
    if case['kind'] == 'speed':
        cmd += ['--rank', str(case['rank']), '--iters', str(case['iters'])]
    return cmd, 'worker'


def run_case(case: dict, py: str, work: pathlib.Path, timeout: float,
             code_root: pathlib.Path, project: str) -> dict:
    cmd, how = command(case, py, work, project)
    out = work / case['id']
    out.mkdir(parents=True, exist_ok=True)
    res = dict(case, how=how, **run_process(cmd, work / f'{case["id"]}.log', timeout, code_root))
    if res['status'] != 'ok':
        return res
    try:
        if how == 'cli':
            res.update(_beam_result(out, res['spawn']))
            m = json.loads((out / 'metrics.json').read_text())
            res['metrics'] = m
            res['ranking'] = {key: m.get(key) for key in (
                'precision_at_k', 'recall_at_k', 'map_at_k', 'ndcg_at_k', 'ranking_users',
                'rank_k', 'relevance_threshold')}
            res['rmse'] = {'test_rmse': m.get('test_rmse'),
                           'test_ratings': m.get('test_ratings')}
            res['iters'] = len(res['per_iteration'] or [])
            if case['kind'] == 'quality':
                res['check'] = _check(case, py, work, timeout, code_root, out)
        else:
            res.update(_worker_result(out, res['spawn']))
            r = json.loads((out / 'result.json').read_text())
            res.update({key: r.get(key) for key in ('ranking', 'rmse', 'params',
                                                    'spark_test_rmse', 'evaluate_seconds')})
            res['iters'] = len(r['per_iteration']) if r.get('per_iteration') else \
                (r.get('params') or {}).get('maxIter')
    except (OSError, KeyError, ValueError, TypeError) as e:
        res['status'] = f'FAILED (no result: {e})'
    return res


def _check(case, py, work, timeout, code_root, out) -> dict:
    """The bench's own scoring of a CLI model (quality_workers.py evaluate)."""
    result = out / 'check.json'
    cmd = [py, str(BENCH / 'quality_workers.py'), 'evaluate', '--data', case['size'],
           '--model_dir', str(out / 'model'), '--rank_k', str(RANK_K), '--out', str(out),
           '--result', str(result)]
    proc = run_process(cmd, work / f'{case["id"]}-check.log', timeout, code_root)
    if proc['status'] != 'ok':
        return {'status': proc['status']}
    r = json.loads(result.read_text())
    return {'status': 'ok', 'ranking': r['ranking'], 'rmse': r.get('rmse')}


# ---------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------

def _get(res, group, key):
    return ((res or {}).get(group) or {}).get(key)


def _find(results, size, method, kind='quality'):
    for r in results:
        if (r['size'], r['method'], r['kind']) == (size, method, kind) and r['status'] == 'ok':
            return r
    return None


def _k(r) -> str:
    m = r.get('metrics') or {}
    p = r.get('params') or {}
    k = (m.get('parameters') or {}).get('latent_factors') or \
        p.get('latent_factors') or p.get('factors') or p.get('rank') or r.get('rank')
    return str(k) if k else '?'


def _label(r) -> str:
    """The method and the parameters it ran with (the modes': from metrics.json)."""
    if r['method'] not in MODES:
        return LABELS[r['method']]
    p = (r.get('metrics') or {}).get('parameters') or r.get('params') or {}
    if not p:
        return LABELS[r['method']]
    text = f'k {p["latent_factors"]}, {p["num_iters"]} it, λ {p["regularization"]:g}'
    if r['method'] == 'wals':
        text += (f', w0 {p["unobs_weight"]:g}, {p["wt_type"]} weights '
                 + (f'{p["feature_wt_factor"]:g}' if p['wt_type'] == 'linear'
                    else f'exp {p["feature_wt_exp"]:g}'))
    elif r['method'] == 'implicit':
        text += ('·n' if p.get('scale_regularization') else '') + \
            f', alpha {p["alpha"]:g}, epsilon {p["epsilon"]:g}, {p["confidence"]} confidence'
    else:
        text += '·n, biases'
    via = 'CLI' if r['how'] == 'cli' else 'in-memory trainer'
    return f'`--model {r["method"]}` defaults ({text}) [{via}]'


def quality_rows(results) -> list[list]:
    rows = []
    for r in results:
        if r['kind'] != 'quality':
            continue
        label = _label(r)
        if r['status'] != 'ok':
            rows.append([r['size'], label] + ['—'] * 7 + [r['status']])
            continue
        rmse = _get(r, 'rmse', 'test_rmse')
        clipped = _get(r, 'rmse', 'test_rmse_clipped')
        rmse_text = '—' if rmse is None else _f(rmse, 4) + (
            f' (clipped {clipped:.4f})' if clipped is not None and r['how'] == 'worker'
            and r['method'] not in MODES else '')
        rows.append([r['size'], label, _k(r), r.get('iters') or '?', rmse_text,
                     _f(_get(r, 'ranking', 'precision_at_k'), 4),
                     _f(_get(r, 'ranking', 'ndcg_at_k'), 4),
                     _f(r.get('seconds_per_iteration'), 3),
                     f'{_f(r["process_wall"], 1)} / {_gib(r["peak_rss"])}',
                     f'{r["load_before"]:.1f}→{r["load_after"]:.1f}'])
    return rows


def check_rows(results) -> list[list]:
    """metrics.json against the bench's own scoring of the same model files."""
    rows = []
    for r in results:
        c = r.get('check')
        if r['kind'] != 'quality' or not c:
            continue
        if c.get('status') != 'ok':
            rows.append([r['size'], r['method'], c.get('status'), '', '', ''])
            continue
        cells, worst = [], 0.0
        # metrics.json's explicit RMSE is of predictions clipped to the training range.
        clipped = bool((r.get('metrics') or {}).get('rmse_clipped_to'))
        for group, key, mine in (('ranking', 'precision_at_k', 'precision_at_k'),
                                 ('ranking', 'ndcg_at_k', 'ndcg_at_k'),
                                 ('rmse', 'test_rmse',
                                  'test_rmse_clipped' if clipped else 'test_rmse')):
            a, b = _get(r, group, key), _get(c, group, mine)
            if a is None and b is None:
                cells.append('—')
                continue
            cells.append(f'{_f(a, 4)} / {_f(b, 4)}')
            if a is None or b is None:
                worst = float('inf')
            else:
                worst = max(worst, abs(a - b))
        rows.append([r['size'], r['method']] + cells +
                     ['yes' if worst < 1e-6 else f'NO (Δ {worst:.2g})'])
    return rows


def speed_rows(results) -> list[list]:
    rows = []
    for size in dict.fromkeys(r['size'] for r in results if r['kind'] == 'speed'):
        base = _find(results, size, 'wals', 'speed')
        for m in MODES:
            r = _find(results, size, m, 'speed')
            if not r:
                rows.append([size, m, SPEED_K, '—', '—', 'NOT RUN / FAILED'])
                continue
            spi = r['seconds_per_iteration']
            ratio = spi / base['seconds_per_iteration'] if base and spi else None
            verdict = ('—' if m == 'wals' else 'n/a' if ratio is None else
                       'PASS' if ratio <= 1.3 else 'FAIL')
            rows.append([size, m, f'{SPEED_K} ({r.get("iters")} it)', _f(spi, 3),
                         f'{ratio:.2f}×' if ratio is not None else 'n/a', verdict])
    return rows


def bar_rows(results) -> list[list]:
    rows = []
    e = _find(results, '100k', 'explicit')
    rmse = _get(e, 'rmse', 'test_rmse')
    if rmse is None:
        rows.append(['explicit test RMSE, ML-100k', 'not run', '≤ 0.92 (goal ≤ 0.90)', 'NOT RUN'])
    else:
        rows.append(['explicit test RMSE, ML-100k', f'{rmse:.4f}', '≤ 0.92 (goal ≤ 0.90)',
                     ('PASS' if rmse <= 0.92 else 'FAIL') +
                     f' (goal {"met" if rmse <= 0.90 else "not met"})'])
    for size in dict.fromkeys(r['size'] for r in results if r['kind'] == 'quality'):
        mine, peer = _find(results, size, 'implicit'), _find(results, size, 'implicit_als')
        for key, name in (('precision_at_k', 'precision@10'), ('ndcg_at_k', 'NDCG@10')):
            a, b = _get(mine, 'ranking', key), _get(peer, 'ranking', key)
            what = f'implicit {name} vs `implicit` ALS, {size}'
            if a is None or b is None:
                rows.append([what, 'n/a', '≥ implicit ALS', 'NOT RUN'])
            else:
                rows.append([what, f'{a:.4f} vs {b:.4f} ({a / b:.3f}×)', '≥ implicit ALS',
                             'PASS' if a >= b else 'FAIL'])
    for row in speed_rows(results):
        if row[1] != 'wals':
            rows.append([f'{row[1]} s/iter vs wals at k={SPEED_K}, {row[0]}', row[4],
                         '≤ 1.3×', row[5]])
    return rows


NOTES = """\
* **Split**: all methods train and test on the same hashed 90/10 split of (user, item)
  pairs, the trainer's own (`wals_core.hashing.is_test` on the IDs' BLAKE2b hashes,
  split_seed 0, test_fraction 0.1); the peers and the bench's scoring read
  `output/bench-data/NAME.split.tsv` made by `bench/prepare_data.py` with that
  function. Test pairs whose user or item has no training rating (cold start) are
  left out of RMSE and of the relevant items.
* **Ranking metrics** (precision@10, NDCG@10): `implicit.evaluation`'s conventions
  (precision's denominator min(K, relevant items); NDCG against the ideal list of
  min(K, relevant) hits). Every user's training items are excluded from their list,
  every other item with a training rating is ranked. **Relevance threshold 0 for
  every method**: all of a user's warm test items are relevant, whatever their
  rating, so the numbers compare across methods (the CLI cases pass
  `--relevance_threshold 0`; its default for explicit ratings is the mean training
  rating, which gives other numbers). The peers' factors (and, as a check, the CLI's
  `model/` files) are scored by `bench/quality_eval.py` with the project's own code,
  `wals_core.topk.top_k` + `wals_core.ranking.ranking_sums`; for explicit models the
  item bias is the item offset of the scores (μ and the user bias do not change a
  user's ranking). The project's numbers in the main table are its `metrics.json`.
* **RMSE**: on the warm test ratings. The project's is its `metrics.json`
  `test_rmse`; Spark's is Spark's own RegressionEvaluator (coldStartStrategy drop:
  the same warm pairs), unclipped; `implicit` and the implicit modes model
  preferences, not ratings: no RMSE.
* **s/iter**: project (CLI): median of `metrics.json` `phase_seconds.per_iteration`;
  in-memory trainer: median of the times between column half-steps; `implicit`:
  median of its per-iteration fit callback times; Spark: marginal
  (fit(maxIter=15) − fit(maxIter=1)) / 14 after a discarded warm-up fit. On 100k
  Spark's figure is mostly scheduling overhead. `wall / peak` is the case process's
  wall seconds (start-up, read, train, evaluate, write) and its process-tree peak RSS.
* **Speed at the same k**: each mode through the CLI at k = 32, 10 iterations, on the
  same data; the issue asks for every mode's s/iter within 1.3× of `wals` at the
  same k. The modes' default-k s/iter in the main table are not comparable with
  each other (k 5, 32, 10).
* **Threads**: the project's solver uses 2 Python threads with BLAS pinned to 1;
  `implicit` `num_threads=2`, BLAS 1 thread; Spark `local[2]`, driver memory 6g.
* The machine is shared (2 cores): `load` is the 1-minute load average before→after
  each case; wall times of cases that ran at a load above 2 are inflated.
"""


def section_text(results, info, argv, started, finished, sizes, work) -> str:
    versions = info['versions']
    project = 'the CLI' if any(r.get('how') == 'cli' for r in results if r['method'] in MODES) \
        else 'the in-memory trainer (the CLI had no --model yet)'
    code = info.get('code') or {}
    lines = [
        '## Quality: every mode against implicit and Spark ALS', '',
        f'Produced by `bench/run_quality.py` on {started:%Y-%m-%d %H:%M} UTC '
        f'({(finished - started).total_seconds() / 60:.0f} min), every number below from '
        f'this one run; the project\'s modes ran through {project}.'
        + (' **This run did not finish: the cases below are those it completed.**'
           if info.get('partial') else ''), '',
        '```', 'bench/setup_env.sh',
        shlex.join(['bench/.venv/bin/python', 'bench/run_quality.py'] + argv), '```', '',
        f'* {info["nproc"]} CPUs: {info["cpu"]}; {info["memory_gib"]:.1f} GiB memory; '
        f'load average at start/end {info["load_start"]:.1f} / {info["load_end"]:.1f}',
        '* ' + ', '.join(f'{k} {v}' for k, v in versions.items() if k != 'blas'),
        f'* Code under test: git {code.get("head", "?")}'
        + (f' plus uncommitted changes to {", ".join(code["uncommitted"])}'
           if code.get('uncommitted') else '')
        + f' (snapshot sha256 {code.get("sha256", "?")})', '',
        _table(['name', 'source', 'ratings', 'users', 'items', 'test ratings'],
               datasets_rows(sizes)), '',
        '### Bars of the issue', '',
        _table(['bar', 'measured', 'required', 'verdict'], bar_rows(results)), '',
        '### Quality and speed (test split; ranking metrics at K = 10, threshold 0)', '',
        _table(['data', 'method', 'k', 'it', 'test RMSE', 'precision@10', 'NDCG@10',
                's/iter', 'wall s / peak GiB', 'load'], quality_rows(results)), '',
        f'### Speed at the same k (k = {SPEED_K}, {SPEED_ITERS} iterations, each mode)', '',
        _table(['data', 'mode', 'k', 's/iter', '× wals', '≤ 1.3×'], speed_rows(results))
        if any(r['kind'] == 'speed' for r in results) else '(not in this run)', '',
    ]
    checks = check_rows(results)
    if checks:
        lines += ['### Check: metrics.json against the bench\'s scoring of the same model files',
                  '', _table(['data', 'mode', 'precision@10 (metrics.json / bench)',
                              'NDCG@10', 'test RMSE', 'agree (< 1e-6)'], checks), '']
    lines += ['### Notes', '', NOTES,
              f'Raw JSON of every case (results.json, per-case result and logs): `{work}` '
              '(under output/, not committed).', '']
    return '\n'.join(lines)


def _load_run(work: pathlib.Path):
    results = json.loads((work / 'results.json').read_text())
    run = json.loads((work / 'run.json').read_text())
    info = run['info']
    if run['finished']:
        finished = datetime.datetime.fromisoformat(run['finished'])
    else:   # an unfinished run: up to its last case, and say so
        last = results[-1]
        finished = datetime.datetime.fromtimestamp(last['spawn'] + last['process_wall'],
                                                   datetime.timezone.utc)
        info.setdefault('load_end', last['load_after'])
        info['partial'] = True
    return (results, info, run['argv'], datetime.datetime.fromisoformat(run['started']),
            finished, run['sizes'])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 epilog=__doc__.split('\n\n', 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sizes', default='100k,10m', help='data sets of the quality table')
    ap.add_argument('--speed_sizes', default='10m',
                    help='data sets of the same-k speed cases (comma list; empty: none)')
    ap.add_argument('--methods', default=None,
                    help=f'comma list of {", ".join(MODES + PEERS)}, speed (default: all)')
    ap.add_argument('--project', choices=('auto', 'cli', 'inmem'), default='auto',
                    help='how the modes run (default auto: the CLI when it has --model)')
    ap.add_argument('--timeout', type=float, default=2400, help='seconds per case')
    ap.add_argument('--out', type=pathlib.Path, default=ROOT / 'BENCHMARKS.md')
    ap.add_argument('--work', type=pathlib.Path, default=None)
    ap.add_argument('--from_results', type=pathlib.Path, default=None,
                    help='only re-write the section from a finished run folder')
    ap.add_argument('--python', default=sys.executable)
    args = ap.parse_args(argv)
    if args.from_results:
        results, info, run_argv, started, finished, sizes = _load_run(args.from_results)
        work = args.from_results
        write_section(args.out, SECTION, section_text(
            results, info, run_argv, started, finished, sizes,
            work.relative_to(ROOT) if work.is_relative_to(ROOT) else work))
        print(f'[quality] wrote the section into {args.out}')
        return 0

    sizes = [s for s in args.sizes.split(',') if s]
    speed_sizes = [s for s in args.speed_sizes.split(',') if s]
    for s in sizes + speed_sizes:
        if s not in ALL_SIZES:
            ap.error(f'unknown size {s!r}')
    methods = [m for m in (args.methods or '').split(',') if m] or None
    started = datetime.datetime.now(datetime.timezone.utc)
    work = (args.work or ROOT / 'output' / 'quality-runs' / started.strftime('%Y%m%d-%H%M%S')
            ).resolve()     # cases run with the code snapshot as their cwd
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.python)
    info['load_start'] = os.getloadavg()[0]
    info['code'] = snapshot_code(work)
    code_root = pathlib.Path(info['code']['root'])
    project = args.project
    if project == 'auto':
        project = 'cli' if cli_supports_modes(args.python, code_root) else 'inmem'
    cases = plan(sizes, speed_sizes, methods)
    print(f'[quality] {len(cases)} cases (modes via {project}), results in {work}', flush=True)
    all_sizes = list(dict.fromkeys(sizes + speed_sizes))
    for s in all_sizes:
        subprocess.run([args.python, str(BENCH / 'prepare_data.py'), s], cwd=ROOT, check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    def save_run(finished=None):     # written first too: a partial run can be rendered
        (work / 'run.json').write_text(json.dumps(
            {'argv': argv, 'info': info, 'started': started.isoformat(),
             'finished': finished and finished.isoformat(), 'sizes': all_sizes,
             'project': project}, indent=2))
    save_run()
    results = []
    for case in cases:
        print(f'[quality] {case["id"]} ...', end=' ', flush=True)
        r = run_case(case, args.python, work, args.timeout, code_root, project)
        results.append(r)
        (work / 'results.json').write_text(json.dumps(results, indent=2, default=str))
        print(f'{r["status"]}: RMSE {_f(_get(r, "rmse", "test_rmse"), 4)}, '
              f'p@10 {_f(_get(r, "ranking", "precision_at_k"), 4)}, '
              f'NDCG@10 {_f(_get(r, "ranking", "ndcg_at_k"), 4)}, '
              f's/iter {_f(r.get("seconds_per_iteration"), 3)}, wall {r["process_wall"]:.0f} s, '
              f'load {r["load_before"]:.1f}', flush=True)
    info['load_end'] = os.getloadavg()[0]
    finished = datetime.datetime.now(datetime.timezone.utc)
    save_run(finished)
    text = section_text(results, info, argv, started, finished, all_sizes,
                        work.relative_to(ROOT) if work.is_relative_to(ROOT) else work)
    write_section(args.out, SECTION, text)
    print('\n' + text)
    print(f'[quality] wrote the section into {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Warm start vs cold start on a new dump (issue: re-runs on new dumps).

For each data set: old dump = the first 90% of the ratings by timestamp, new dump =
all of them. Trains the old model (cold), then on the new dump a cold run (every
iteration) and a warm run (--previous_model old model, --tolerance). Counts, from
metrics['history'], the iterations each needs to come within 0.5% of the cold run's
final training objective, and the wall time; target: warm <= 1/3 of cold's.

    python bench/bench_warm_start.py                  # ml-100k and synthetic ml-1m
    python bench/bench_warm_start.py --sets ml-100k --num_iters 20

Prints a table, writes bench/results/warm_start.md and the "Warm start on a new
dump" section of BENCHMARKS.md (between its markers; appended when absent).
Runs the CLI (python -m pipeline.train, DirectRunner) in subprocesses, one at a time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))
from run_bench import write_section  # noqa: E402
ML100K = ROOT.parent / 'shared' / 'data' / 'ml-100k' / 'u.data'
WORK = ROOT / 'output' / 'bench-warm'
WITHIN = 0.005


def dumps(name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(old dump, new dump) files for a data set, cached under output/bench-warm/."""
    folder = WORK / name
    old, new = folder / 'old.tsv', folder / 'new.tsv'
    if old.exists() and new.exists():
        return old, new
    folder.mkdir(parents=True, exist_ok=True)
    if name == 'ml-100k':
        data = np.loadtxt(ML100K, dtype=np.int64, delimiter='\t')
    else:
        from pipeline.io.synth import PRESETS, generate_ratings
        u, i, r, t = generate_ratings(**PRESETS[name], seed=0)
        data = np.stack([u, i, r.astype(np.int64), t], axis=1)
    data = data[np.argsort(data[:, 3], kind='stable')]       # by timestamp
    cut = int(len(data) * 0.9)
    for path, part in ((old, data[:cut]), (new, data)):
        np.savetxt(path, part, fmt='%d', delimiter='\t')
    return old, new


def train(args: list[str], out: pathlib.Path) -> tuple[dict, float]:
    cmd = [sys.executable, '-m', 'pipeline.train', '--output', str(out), '--overwrite',
           *map(str, args)]
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f'{" ".join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}')
    return json.loads((out / 'metrics.json').read_text()), wall


def iterations_to(history: list[dict], target: float) -> int | None:
    """The first iteration whose objective is within WITHIN of target (None: never)."""
    for h in history:
        if h['solved'] and h['objective'] <= target * (1 + WITHIN):
            return h['iteration']
    return None


def bench(name: str, model_args: list[str], tolerance: float) -> dict:
    old, new = dumps(name)
    runs = WORK / name / 'runs'
    old_metrics, _ = train(['--input', old, *model_args], runs / 'old')
    cold, cold_wall = train(['--input', new, *model_args], runs / 'cold')
    warm, warm_wall = train(['--input', new, '--previous_model', runs / 'old',
                             '--tolerance', tolerance, *model_args], runs / 'warm')
    target = cold['history'][-1]['objective']
    row = {'set': name, 'ratings_old': old_metrics['lines']['kept'],
           'ratings_new': cold['lines']['kept'], 'target_objective': target,
           'cold_iters': iterations_to(cold['history'], target),
           'cold_run': cold['iterations_run'], 'cold_wall': cold_wall,
           'cold_pipeline': cold['phase_seconds']['pipeline'],
           'warm_iters': iterations_to(warm['history'], target),
           'warm_run': warm['iterations_run'], 'warm_wall': warm_wall,
           'warm_pipeline': warm['phase_seconds']['pipeline'],
           'warm_final': warm['history'][-1]['objective'],
           'cold_test_rmse': cold['test_rmse'], 'warm_test_rmse': warm['test_rmse']}
    row['ok'] = (row['warm_iters'] is not None and row['cold_iters'] is not None
                 and row['warm_iters'] * 3 <= row['cold_iters'])
    return row


def table(rows: list[dict]) -> str:
    head = ('| data | ratings old → new | cold: iters to 0.5% / run | warm: iters to 0.5% / '
            'run | warm final obj / cold final | test RMSE cold / warm | wall s cold / warm '
            '(pipeline) | warm ≤ 1/3 |\n|---|---|---|---|---|---|---|---|\n')
    lines = []
    for r in rows:
        lines.append(
            f'| {r["set"]} | {r["ratings_old"]:,} → {r["ratings_new"]:,} | '
            f'{r["cold_iters"]} / {r["cold_run"]} | {r["warm_iters"]} / {r["warm_run"]} | '
            f'{r["warm_final"] / r["target_objective"]:.4f} | '
            f'{r["cold_test_rmse"]:.4f} / {r["warm_test_rmse"]:.4f} | '
            f'{r["cold_wall"]:.0f} / {r["warm_wall"]:.0f} ({r["cold_pipeline"]:.0f} / '
            f'{r["warm_pipeline"]:.0f}) | {"yes" if r["ok"] else "NO"} |')
    return head + '\n'.join(lines) + '\n'


def section(rows: list[dict], args) -> str:
    load = os.getloadavg()
    return ('## Warm start on a new dump\n\n'
            f'`python bench/bench_warm_start.py {" ".join(sys.argv[1:])}`'
            f' — {datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores, '
            f'load {load[0]:.1f} at the end, DirectRunner.\n\n'
            'Old dump: the first 90% of the ratings by timestamp; new dump: all of them '
            '(MovieLens 100k; the synthetic generator\'s ml-1m preset, whose timestamps '
            'are uniform per user). The old model is trained cold on the old dump; on '
            'the new dump a cold run does every iteration, a warm run starts from the '
            f'old model (`--previous_model`, `--tolerance {args.tolerance:g}`). '
            f'Model: `{" ".join(args.model_args)}`. "Iters to 0.5%": the first '
            'iteration whose training objective (metrics.json history) is within 0.5% of '
            'the cold run\'s final objective; "run": iterations actually solved '
            '(--tolerance stops the warm run). Target: warm ≤ 1/3 of cold.\n\n'
            + table(rows))


def write_sections(text: str) -> None:
    results = ROOT / 'bench' / 'results'
    results.mkdir(exist_ok=True)
    (results / 'warm_start.md').write_text(text)
    write_section(ROOT / 'BENCHMARKS.md', 'warm-start', text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--sets', default='ml-100k,ml-1m',
                    help='ml-100k (../shared) and/or synth presets. Default: ml-100k,ml-1m.')
    ap.add_argument('--tolerance', type=float, default=1e-4)
    ap.add_argument('--model_args', nargs=argparse.REMAINDER,
                    default=['--model', 'wals', '--num_iters', '20'],
                    help='trainer options of all three runs (last). Default: '
                         '--model wals --num_iters 20.')
    args = ap.parse_args()
    rows = []
    for name in args.sets.split(','):
        row = bench(name, args.model_args, args.tolerance)
        rows.append(row)
        print(table([row]), flush=True)
    print(table(rows))
    write_sections(section(rows, args))
    return 0 if all(r['ok'] for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())

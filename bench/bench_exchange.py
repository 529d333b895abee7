"""Broadcast vs routed factor exchange (--exchange) on the 20m synthetic set.

One script run, every case a `python -m pipeline.train` subprocess one at a time:
  broadcast and routed on the DirectRunner in_memory: seconds per iteration
  (metrics.json history, iterations 2.. : the first also plans the solves);
  broadcast and routed under multi_processing (2 worker processes): the peak RSS
  of every process of the run (sampled with psutil every 0.2 s), and from
  metrics.json 'exchange' the most other-side factor rows one block solve held.
Checks that all runs wrote byte-identical model files. Target (issue 12):
routed s/iter <= 2x broadcast; no process holds the whole other side.

    python bench/bench_exchange.py                    # 20m, k=32, 4 iterations, blocks of 4096
    python bench/bench_exchange.py --size 1m --num_iters 3

Prints a table, writes bench/results/exchange.md and the "exchange" section of
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))
from run_bench import write_section  # noqa: E402

WORK = ROOT / 'output' / 'bench-exchange'
PRESETS = {'1m': 'ml-1m', '10m': 'ml-10m', '20m': 'ml-20m'}
MODEL = ('user.npy', 'item.npy', 'row.npy', 'col.npy')


def data(size: str) -> pathlib.Path:
    path = WORK / f'{size}.data'
    if not path.exists():
        from pipeline.io.synth import PRESETS as SYNTH, generate_ratings, write_movielens
        WORK.mkdir(parents=True, exist_ok=True)
        write_movielens(str(path), *generate_ratings(**SYNTH[PRESETS[size]], seed=0))
    return path


def _sample(proc: subprocess.Popen, peaks: dict, stop: threading.Event) -> None:
    """Peak RSS (bytes) of the run's process and every descendant, by pid."""
    root = psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                rss = p.memory_info().rss
                name = ' '.join(p.cmdline()[1:4])[:60]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            old = peaks.get(p.pid, (0, name))
            peaks[p.pid] = (max(old[0], rss), name)
        time.sleep(0.2)


def run(name: str, input_path: pathlib.Path, args: argparse.Namespace, extra: list[str]):
    out = WORK / 'runs' / name
    cmd = [sys.executable, '-m', 'pipeline.train', '--input', str(input_path),
           '--output', str(out), '--overwrite', '--num_iters', str(args.num_iters),
           '--latent_factors', str(args.k), '--rank_k', '0',
           '--block_size', str(args.block_size), *extra]
    peaks: dict = {}
    stop = threading.Event()
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = threading.Thread(target=_sample, args=(proc, peaks, stop), daemon=True)
    sampler.start()
    log = proc.communicate()[0]
    stop.set()
    sampler.join()
    wall = time.time() - started
    if proc.returncode:
        raise SystemExit(f'{name} failed:\n{log[-3000:]}')
    m = json.loads((out / 'metrics.json').read_text())
    secs = [h['seconds'] for h in m['history'] if h.get('seconds') is not None]
    digest = hashlib.sha256(b''.join((out / 'model' / f).read_bytes() for f in MODEL))
    return dict(name=name, wall=wall, s_iter=float(np.median(secs[1:] or secs)), secs=secs,
                peaks=peaks, exchange=m.get('exchange', {}), users=m['users'],
                items=m['items'], sha=digest.hexdigest()[:12])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--size', default='20m', choices=sorted(PRESETS))
    ap.add_argument('--num_iters', type=int, default=4)
    ap.add_argument('--k', type=int, default=32)
    # Smaller than the trainer's default (16384): more blocks, so that a block's
    # ratings refer to part of the other side (at 20m, a 16384-user block rates
    # nearly every item).
    ap.add_argument('--block_size', type=int, default=4096)
    args = ap.parse_args(argv)
    path = data(args.size)
    load0 = os.getloadavg()[0]
    mp = ['--direct_running_mode', 'multi_processing', '--direct_num_workers', '2']
    cases = [('broadcast', ['--exchange', 'broadcast']), ('routed', ['--exchange', 'routed']),
             ('broadcast_mp', ['--exchange', 'broadcast', *mp]),
             ('routed_mp', ['--exchange', 'routed', *mp])]
    results = []
    for name, extra in cases:
        print(f'[exchange] {name} ...', flush=True)
        results.append(run(name, path, args, extra))
        r = results[-1]
        print(f'[exchange] {name}: {r["s_iter"]:.2f} s/iter, wall {r["wall"]:.0f} s', flush=True)
    load1 = os.getloadavg()[0]
    base = results[0]
    width = args.k * 4

    def held(r, side):
        v = r['exchange'].get(f'{side}_solves', {}).get('other_rows_held_max')
        return 'n/a' if v is None else f'{v:,}'

    def sent(r, side):
        return r['exchange'].get(f'{side}_solves', {}).get('own_rows_routed') or 0

    lines = [
        f'Produced by `bench/bench_exchange.py --size {args.size} --num_iters {args.num_iters} '
        f'--k {args.k} --block_size {args.block_size}` on {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, one script run; '
        f'{os.cpu_count()} CPUs, load average {load0:.1f} at start, {load1:.1f} at end '
        f'(1 min; the machine is shared, so seconds are indicative and ratios come from '
        f'this one run). Data: pipeline/io/synth.py preset {PRESETS[args.size]}, seed 0 '
        f'({base["users"]:,} users, {base["items"]:,} items); --model wals, '
        f'--latent_factors {args.k}, --block_size {args.block_size}, --rank_k 0. python {platform.python_version()}.',
        '',
        '| run | s/iter (median of iterations 2..) | vs broadcast | wall s | '
        'most item rows one user-block solve held | most user rows one item-block solve '
        'held | factor rows shuffled per iteration | largest process peak RSS | '
        'model sha256 |',
        '|---|---|---|---|---|---|---|---|---|']
    for r in results:
        peak = max(p[0] for p in r['peaks'].values()) if r['peaks'] else 0
        shuffled = (sent(r, 'row') + sent(r, 'col')) / max(1, args.num_iters)
        lines.append(
            f'| {r["name"]} | {r["s_iter"]:.2f} | {r["s_iter"] / base["s_iter"]:.2f}× | '
            f'{r["wall"]:.0f} | {held(r, "row")} of {r["items"]:,} | '
            f'{held(r, "col")} of {r["users"]:,} | {shuffled:,.0f} '
            f'({shuffled * width / 2**20:,.0f} MiB) | {peak / 2**30:.2f} GiB | {r["sha"]} |')
    same = len({r['sha'] for r in results}) == 1
    lines += ['', f'Model files of all runs byte-identical: **{"yes" if same else "NO"}**.', '']
    for r in results:
        if r['name'].endswith('_mp'):
            lines.append(f'Per-process peak RSS, {r["name"]}:')
            lines.append('')
            lines.append('| pid | process | peak RSS MiB |')
            lines.append('|---|---|---|')
            for pid, (rss, name) in sorted(r['peaks'].items(), key=lambda kv: -kv[1][0]):
                if rss > 50 << 20:
                    lines.append(f'| {pid} | `{name}` | {rss / 2**20:,.0f} |')
            lines.append('')
    text = '\n'.join(lines)
    print(text)
    (ROOT / 'bench' / 'results').mkdir(exist_ok=True)
    (ROOT / 'bench' / 'results' / 'exchange.md').write_text(
        '# Broadcast vs routed exchange\n\n' + text + '\n')
    write_section(ROOT / 'BENCHMARKS.md', 'exchange',
                  '## Factor exchange: broadcast vs routed\n\n' + text)
    return 0 if same else 1


if __name__ == '__main__':
    sys.exit(main())

"""Where a Beam iteration's time goes: a per-stage profile of the training pipeline.

    pip install -r bench/requirements.txt          # py-spy (a sampling profiler)
    bench/.venv/bin/python bench/profile_pipeline.py --data 10m --ranks 10,32

For each rank the pipeline (`python -m pipeline.train`, DirectRunner in_memory) runs
twice under py-spy, with --iters_low and --iters_high iterations (default 2 and 12);
everything but the iterations is the same in both runs, so the difference of the
two profiles, divided by the difference of iterations, is what one more iteration
costs, category by category (solve, objective, the runner's data plane, ...). py-spy
samples every thread of the process --rate times a second; a sample is counted for
the innermost frame that matches a category (CATEGORIES, first match wins), and
waiting threads (locks, sleeps, idle workers) are left out, so the seconds are
thread-seconds of work: the solve runs on 2 threads and can exceed its wall time.

Writes bench/results/pipeline_profile.md and its section of BENCHMARKS.md (and prints it).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'bench'))

from prepare_data import cpu_model, paths, prepare  # noqa: E402
from run_bench import write_section  # noqa: E402

# A sample counts for the innermost frame that is the project's code or Beam's (numpy,
# the standard library and other libraries count for whoever called them). The
# project's frames are named by these (substring of "function (file:line)", first
# match wins), else by their module; Beam's by BEAM.
PROJECT = (
    ('solve (wals_core solve/cg)', 'wals_core/solve.py'),
    ('solve (wals_core solve/cg)', 'wals_core/cg.py'),
    ('evaluation (test RMSE, ranking)', 'predict (wals_core/objectives.py'),
    ('training objective', 'wals_core/objectives.py'),
    ('training objective', 'slice_terms ('),
    ('training objective', 'entry_weights ('),
    ('training objective', 'wals_core/sums.py'),
    ('training objective', 'training/convergence.py'),
    ('evaluation (test RMSE, ranking)', 'training/evaluate'),
    ('evaluation (test RMSE, ranking)', 'wals_core/topk.py'),
    ('evaluation (test RMSE, ranking)', 'wals_core/metrics.py'),
    ('read and parse', 'pipeline/io/'),
    ('group into blocks', 'training/blocks.py'),
    ('write model', 'training/write_model.py'),
)
BEAM = (
    ('Beam: data plane (element transfer)', 'data_plane.py'),
    ('Beam: coders and pickling', 'apache_beam/coders'),
    ('Beam: coders and pickling', 'apache_beam/internal'),
    ('Beam: side inputs', 'sideinputs'),
    ('Beam: bundle execution', 'apache_beam/runners/worker'),
    ('Beam: bundle execution', 'apache_beam/runners/common'),
    ('Beam: runner (stage scheduling, buffers)', 'apache_beam/runners/portability'),
    ('Beam: graph construction and checks', 'apache_beam/transforms'),
    ('Beam: graph construction and checks', 'apache_beam/pipeline.py'),
    ('Beam: graph construction and checks', 'apache_beam/runners/direct'),
    ('Beam: other', 'apache_beam/'),
)
# Leaf frames of a thread that waits rather than works.
# (Thread.run as the leaf: a thread blocked in native code, e.g. a queue's get.)
IDLE = ('Condition.wait', 'Event.wait', '_Heartbeat._run', 'Thread.join', 'select ',
        '_worker (concurrent', 'Thread.run (', '_serve (grpc')


def frame_category(frame: str) -> str | None:
    """The category of one py-spy frame "function (file:line)", or None."""
    name, _, where = frame.rpartition(' (')
    path = where.rsplit(':', 1)[0]
    if name == '<module>' or path.startswith('<frozen importlib'):
        return 'Python imports'
    if path.startswith(('pipeline/', 'wals_core/')):
        hit = next((c for c, pat in PROJECT if pat in frame), None)
        return hit or f'project: {path} ({name})'
    if path.startswith('apache_beam/'):
        return next(c for c, pat in BEAM if pat in frame)
    return None


def categorize(raw: pathlib.Path) -> collections.Counter:
    """Samples per category from py-spy's raw (collapsed stacks) output."""
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(' ')
        frames = stack.split(';')
        if frames[-1].startswith(IDLE) or not frames[-1].strip():
            continue
        hit = next((c for c in map(frame_category, reversed(frames)) if c), None)
        counts[hit or 'other (imports, interpreter start)'] += int(n)
    return counts


def profile_run(py: str, data: str, rank: int, iters: int, rate: int,
                work: pathlib.Path) -> dict:
    out = work / f'k{rank}-it{iters}'
    raw = work / f'k{rank}-it{iters}.txt'
    cmd = [str(pathlib.Path(py).parent / 'py-spy'), 'record', '-r', str(rate), '-f', 'raw',
           '-o', str(raw), '--nonblocking', '--', py, '-m', 'pipeline.train',
           '--input', str(paths(data)['raw']), '--output', str(out),
           '--latent_factors', str(rank), '--num_iters', str(iters),
           '--runner', 'DirectRunner', '--direct_running_mode', 'in_memory']
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    phases = json.loads((out / 'metrics.json').read_text())['phase_seconds']
    shutil.rmtree(out)
    return {'counts': categorize(raw), 'phases': phases, 'iters': iters}


def report(results: dict, args, started: datetime.datetime) -> str:
    head = git_head()
    lines = ['## Where a Beam iteration goes: per-stage profile (bench/profile_pipeline.py)', '',
             f'Date: {started:%Y-%m-%d %H:%M} UTC. Commit: {head}. Machine: {cpu_model("?")}, '
             f'{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end.',
             'Command: `' + shlex.join(['bench/.venv/bin/python', 'bench/profile_pipeline.py']
                                       + args.argv) + '`',
             '',
             f'Data: {args.data}; DirectRunner in_memory; two runs per rank under py-spy '
             f'({args.rate} samples/s per thread), {args.iters_low} and {args.iters_high} '
             'iterations: a row is (samples of the long run − samples of the short run) / '
             f'{args.iters_high - args.iters_low} iterations, in thread-seconds of work '
             '(waiting threads left out). "wall s/iter" is the pipeline\'s own median '
             'from metrics.json (long run); "solve s/iter" its time inside the numpy solves.',
             '']
    for rank, (lo, hi) in results.items():
        n = hi['iters'] - lo['iters']
        per = {c: (hi['counts'][c] - lo['counts'][c]) / n / args.rate
               for c in set(hi['counts']) | set(lo['counts'])}
        total = sum(v for v in per.values() if v > 0)
        wall = statistics.median(hi['phases']['per_iteration'])
        solve = statistics.median(hi['phases']['solve_per_iteration'])
        lines += [f'### k = {rank}: wall {wall:.3f} s/iter, solve {solve:.3f} s/iter', '',
                  '| category | s per iteration | share |', '|---|---:|---:|']
        shown = sorted(((c, v) for c, v in per.items() if v >= 0.0005), key=lambda kv: -kv[1])
        for c, v in shown[:args.top]:
            lines.append(f'| {c} | {v:.3f} | {v / total * 100:.0f}% |')
        rest = sum(v for _, v in shown[args.top:])
        noise = sum(v for v in per.values() if v < 0)
        lines += [f'| the {max(len(shown) - args.top, 0)} other categories | {rest:.3f} | '
                  f'{rest / total * 100:.0f}% |' if total else '',
                  f'| **all categories** | **{total:.3f}** | |',
                  f'| (categories with fewer samples in the long run: noise) | {noise:.3f} | |',
                  '']
    return '\n'.join(lines) + '\n'


def git_head() -> str:
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, text=True,
                              capture_output=True).stdout.strip() or '?'
    except OSError:
        return '?'


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--data', default='10m', help='data set of bench/prepare_data.py')
    ap.add_argument('--ranks', default='10,32', help='comma list of k')
    ap.add_argument('--iters_low', type=int, default=2)
    ap.add_argument('--iters_high', type=int, default=12)
    ap.add_argument('--rate', type=int, default=100, help='py-spy samples per second')
    ap.add_argument('--top', type=int, default=15, help='categories listed per rank')
    ap.add_argument('--no_section', dest='section', action='store_false',
                    help='do not put the table into BENCHMARKS.md (only --out)')
    ap.add_argument('--keep', type=pathlib.Path, default=None,
                    help='folder to keep the raw py-spy profiles in (default: discarded)')
    ap.add_argument('--out', type=pathlib.Path,
                    default=ROOT / 'bench' / 'results' / 'pipeline_profile.md')
    args = ap.parse_args(argv)
    args.argv = argv
    if args.iters_high <= args.iters_low:
        ap.error('--iters_high must be above --iters_low')
    if not shutil.which('py-spy', path=str(pathlib.Path(sys.executable).parent)):
        ap.error('py-spy is not installed beside this interpreter: '
                 'pip install -r bench/requirements.txt')
    prepare(args.data)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {}
    with tempfile.TemporaryDirectory(prefix='wals-profile-') as tmp:
        tmp = args.keep or tmp
        pathlib.Path(tmp).mkdir(parents=True, exist_ok=True)
        for rank in (int(r) for r in args.ranks.split(',')):
            runs = []
            for iters in (args.iters_low, args.iters_high):
                print(f'[profile] k={rank}, {iters} iterations ...', flush=True)
                runs.append(profile_run(sys.executable, args.data, rank, iters, args.rate,
                                        pathlib.Path(tmp)))
            results[rank] = runs
    text = report(results, args, started)
    print(text)
    args.out.write_text(text)
    if args.section:
        write_section(ROOT / 'BENCHMARKS.md', 'pipeline-profile', text)
    print(f'[profile] wrote {args.out}' + (' and its section of BENCHMARKS.md'
                                           if args.section else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())

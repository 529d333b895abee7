"""Stress harness for the block build under the DirectRunner's multi_processing mode.

Repeats the path that once lost training ratings (README, "The factor exchange",
runner note: 17,353,549 of 18,001,428 at 20m) and counts every element at every
stage boundary, against counts computed without Beam from bench/prepare_data.py's
split file (dense indices and the project's test flags):

  rows      the row blocks: training ratings in them (block files on disk)
  sent      pieces and ratings the row-block stage sends to the column shuffle
            (the 'blocks' counters of pipeline/training/blocks.py)
  received  pieces and ratings the column-block stage receives from it
  cols      the column blocks: ratings in them (counter, and the files on disk)
  counted   the column counts the trainer's guard sums (_AssembleCounts)

A run that loses or repeats anything is a reproduction; the harness then lists the
(row block, column block) pieces missing from the column block files.

Modes (--mode):
  blocks  the trainer's own transforms (ReadAndCheck, the vocabularies, BuildBlocks,
          SummarizeTraining, _AssembleCounts) in a graph that stops after the blocks,
          each run a child process on the DirectRunner (multi_processing, 2 workers)
  train   `python -m pipeline.train` itself (--num_iters N, broadcast exchange,
          k = 32, --rank_k 0, as bench/bench_exchange.py ran it); a reproduction is
          the guard's error (exit 1 naming the column blocks)

Pressure (optional): --cache_mb sets WALS_BLOCK_CACHE_MB for the run (a small cache
makes every stage re-read blocks from disk); --hog_gib N keeps N GiB of touched
memory in a separate process during each run; --cpu_hogs N runs N processes that
burn CPU (the original loss was seen at load 5-7).

    python bench/stress_multiprocessing.py                      # 20m, 3 block runs
    python bench/stress_multiprocessing.py --sizes 1m 20m --runs 5 --cache_mb 64
    python bench/stress_multiprocessing.py --mode train --sizes 20m --runs 2

Writes bench/results/stress_multiprocessing.md (appending one section per script
run, newest first) and prints the same table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The stages under test: this tree, or a snapshot of another revision (--code).
CODE = pathlib.Path(os.environ.get('STRESS_CODE_ROOT', ROOT))
sys.path.insert(0, str(ROOT / 'bench'))
sys.path.insert(0, str(CODE))

WORK = ROOT / 'output' / 'stress-mp'
RESULTS = ROOT / 'bench' / 'results' / 'stress_multiprocessing.md'
STAGES = ('rows', 'sent', 'received', 'cols', 'counted')
STARTED = time.strftime('%Y%m%dT%H%M%S')


# --- expected counts, without Beam ------------------------------------------------

def expected_pieces(name: str, block_size: int) -> np.ndarray:
    """Training ratings per (row block, column block) after duplicates are merged,
    from NAME.split.tsv (int64 matrix; cached next to the run folders)."""
    import hashlib

    from prepare_data import paths, prepare, read_split
    prepare(name)
    # Keyed by what made the data (a changed generator rebuilds the data set).
    recipe = hashlib.sha256(paths(name)['meta'].read_bytes()).hexdigest()[:12]
    cache = WORK / f'expected-{name}-{block_size}-{recipe}.npy'
    if cache.exists():
        return np.load(cache)
    u, i, _, t, n_users, n_items = read_split(name)
    train = t == 0
    pairs = np.unique(u[train].astype(np.int64) * n_items + i[train])
    rows, cols = pairs // n_items, pairs % n_items
    shape = (-(-n_users // block_size), -(-n_items // block_size))
    m = np.zeros(shape, np.int64)
    np.add.at(m, (rows // block_size, cols // block_size), 1)
    WORK.mkdir(parents=True, exist_ok=True)
    np.save(cache, m)
    return m


def pieces_on_disk(folder: pathlib.Path, block_size: int, shape) -> dict:
    """What the run's saved blocks hold: training ratings per (row block, column block)
    of the column block files, and per row block of the row block files."""
    m = np.zeros(shape, np.int64)
    for f in sorted((folder / 'cols').glob('block-*.npz')):
        c = int(f.stem.split('-')[1])
        with np.load(f) as z:
            m[:, c] = np.bincount(z['indices'] // block_size, minlength=shape[0])[:shape[0]]
    rows = np.zeros(shape[0], np.int64)
    for f in sorted((folder / 'rows').glob('block-*.npz')):
        with np.load(f) as z:
            rows[int(f.stem.split('-')[1])] = len(z['indices'])
    return {'col_pieces': m, 'rows': rows}


# --- the child: one pipeline run --------------------------------------------------

def _ledger(ref, folder: str, side: str):
    """Side channel: one line per block reference, appended by the process that
    made it (pid, the order it saw them), so a block built twice shows."""
    line = json.dumps({'side': side, 'block': ref.block_id, 'rows': ref.num_rows,
                       'nnz': int(ref.load().train.nnz), 'pid': os.getpid(),
                       't': time.time()})
    with open(os.path.join(folder, f'{side}-{os.getpid()}.jsonl'), 'a') as f:
        f.write(line + '\n')
    return ref


def _save(value, path: str, what: str):
    with open(path, 'w') as f:
        json.dump({what: value}, f)


def child(args) -> int:
    """Runs the blocks graph once; writes result.json into --run_dir."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions, TypeOptions
    from apache_beam.pvalue import AsSingleton

    from pipeline.options import config_from_options
    try:      # the package layout since the runners/ and training/ split
        from pipeline.io.read_summary import ReadAndCheck
        from pipeline.io.vocabulary import UniqueIds
        from pipeline.runners.memory_tuning import tune_malloc
        from pipeline.training.blocks import COUNTERS, BlockConfig, BuildBlocks
        from pipeline.training.graph import _AssembleCounts, _count_vocab, _read_config
        from pipeline.training.rating_stats import SummarizeTraining
    except ImportError:   # an earlier revision (--code), flat pipeline/
        from pipeline.blocks import COUNTERS, BlockConfig, BuildBlocks
        from pipeline.memory_tuning import tune_malloc
        from pipeline.rating_stats import SummarizeTraining
        from pipeline.read_summary import ReadAndCheck
        from pipeline.train_graph import _AssembleCounts, _count_vocab, _read_config
        from pipeline.vocabulary import UniqueIds

    tune_malloc()
    # What the data plane says when it drops or waits (INFO), in the log of the run,
    # from the runner and (--default_sdk_harness_log_level) from the workers.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger('apache_beam.runners.worker.data_plane').setLevel(logging.INFO)
    logging.getLogger('apache_beam.runners.portability.fn_api_runner').setLevel(logging.INFO)
    logging.getLogger('apache_beam.runners.portability.local_job_service').setLevel(logging.INFO)
    run_dir = pathlib.Path(args.run_dir)
    ledger = run_dir / 'ledger'
    ledger.mkdir(parents=True, exist_ok=True)
    argv = ['--input', args.input, '--output', str(run_dir / 'model'),
            '--block_size', str(args.block_size),
            '--direct_running_mode', args.running_mode,
            '--direct_num_workers', str(args.workers),
            '--default_sdk_harness_log_level', 'INFO']
    options = PipelineOptions(argv)
    options.view_as(TypeOptions).pipeline_type_check = False
    cfg = config_from_options(options)
    # The same BlockConfig as TrainWals builds for --data_type ratings.
    block_cfg = BlockConfig(cfg.block_size, cfg.test_fraction, cfg.split_seed,
                            'sum' if cfg.data_type == 'web_views' else 'mean',
                            holdout=False)
    started = time.time()
    p = beam.Pipeline(options=options)
    chunks, reads, _ = p | 'Read' >> ReadAndCheck(_read_config(cfg, cfg.input),
                                                  cfg.max_bad_fraction)
    users = (chunks | 'UserIds' >> beam.CombineGlobally(UniqueIds('user_ids'))
             | 'CountUsers' >> beam.Map(_count_vocab, 'users', AsSingleton(reads)))
    items = (chunks | 'ItemIds' >> beam.CombineGlobally(UniqueIds('item_ids'))
             | 'CountItems' >> beam.Map(_count_vocab, 'items', AsSingleton(reads)))
    row_blocks, col_blocks = chunks | 'Blocks' >> BuildBlocks(
        block_cfg, users, items, str(run_dir / 'blocks'))
    ratings = row_blocks | 'TrainingRatings' >> beam.CombineGlobally(SummarizeTraining())
    counts = col_blocks | 'ColCounts' >> beam.CombineGlobally(_AssembleCounts())
    _ = row_blocks | 'LedgerRows' >> beam.Map(_ledger, str(ledger), 'row')
    _ = col_blocks | 'LedgerCols' >> beam.Map(_ledger, str(ledger), 'col')
    _ = ratings | 'SaveRatings' >> beam.Map(lambda r, path: _save(r.count, path, 'count'),
                                            str(run_dir / 'ratings.json'))
    _ = counts | 'SaveCounts' >> beam.Map(lambda c, path: _save(int(c.sum()), path, 'sum'),
                                          str(run_dir / 'counts.json'))
    # As every command does (pipeline/runners/factory.py), unless asked not to; a
    # revision from before the fix (--code) has no pipeline/runners/beam_fixes.py.
    try:
        from pipeline.runners import beam_fixes
    except ImportError:
        beam_fixes = None
    if beam_fixes is not None and not args.no_beam_fix:
        beam_fixes.apply()
    if args.trace_runner:
        import runner_trace
        runner_trace.install(str(run_dir / 'runner_trace.jsonl'))
    result = p.run()
    result.wait_until_finish()
    counters = {}
    for name in COUNTERS:
        found = result.metrics().query(MetricsFilter().with_namespace('blocks')
                                       .with_name(name))['counters']
        counters[name] = sum((c.committed if c.committed is not None else c.attempted)
                             for c in found)
    out = {'seconds': round(time.time() - started, 1), 'counters': counters,
           'beam_fix': beam_fixes is not None and not args.no_beam_fix,
           'ratings': json.loads((run_dir / 'ratings.json').read_text())['count'],
           'counted': json.loads((run_dir / 'counts.json').read_text())['sum']}
    (run_dir / 'result.json').write_text(json.dumps(out))
    return 0


# --- the parent: runs, memory, analysis -------------------------------------------

def _sample_rss(proc: subprocess.Popen, peak: list, stop: threading.Event) -> None:
    """Largest sum of RSS over the run's process tree (bytes)."""
    import psutil
    root = psutil.Process(proc.pid)
    while not stop.is_set():
        total = 0
        try:
            for q in [root, *root.children(recursive=True)]:
                try:
                    total += q.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return
        peak[0] = max(peak[0], total)
        time.sleep(0.5)


def _hog(gib: float) -> subprocess.Popen | None:
    """A process holding `gib` GiB of touched memory until killed."""
    if gib <= 0:
        return None
    code = ('import numpy, sys, time\n'
            f'a = numpy.ones(int({gib} * 2**30) // 8)\n'
            'sys.stdout.write("ready\\n"); sys.stdout.flush()\n'
            'time.sleep(86400)\n')
    hog = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    hog.stdout.readline()
    return hog


def _spinners(n: int) -> list:
    """n processes that only burn CPU (the original loss was seen at load 5-7)."""
    return [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(n)]


def code_root(rev: str | None) -> pathlib.Path:
    """The tree the runs execute: this checkout, or `git archive REV` unpacked once
    under output/ (to stress an earlier design of the stages, e.g. the column
    shuffle before docs/multiprocessing-loss.md; REV must have the 'blocks'
    counters of the block build)."""
    if not rev:
        return ROOT
    sha = subprocess.run(['git', 'rev-parse', '--short', rev], cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout.strip()
    out = WORK / f'code-{sha}'
    if not out.exists():
        tmp = WORK / f'code-{sha}.tmp'
        subprocess.run(['rm', '-rf', str(tmp)], check=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(['git', 'archive', sha], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(['tar', '-x', '-C', str(tmp)], input=archive, check=True)
        tmp.rename(out)
    return out


def run_once(args, size: str, index: int, expected: np.ndarray) -> dict:
    from prepare_data import paths
    data = paths(size)['raw']
    code = code_root(args.code)
    # One folder per script run and run: a lost run's blocks and logs are kept.
    run_dir = WORK / 'runs' / f'{STARTED}-{size}-{args.mode}-{index:03d}'
    if run_dir.exists():
        subprocess.run(['rm', '-rf', str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(code), STRESS_CODE_ROOT=str(code))
    if args.cache_mb:
        env['WALS_BLOCK_CACHE_MB'] = str(args.cache_mb)
    mp = ['--direct_running_mode', 'multi_processing', '--direct_num_workers',
          str(args.workers)]
    if args.mode == 'blocks':
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), '--child',
               '--input', str(data), '--run_dir', str(run_dir),
               '--block_size', str(args.block_size), '--workers', str(args.workers),
               '--running_mode', 'multi_processing'] + (['--trace_runner'] if args.trace_runner
                                                        else []) \
            + (['--no_beam_fix'] if args.no_beam_fix else [])
    else:
        cmd = [sys.executable, '-m', 'pipeline.train', '--input', str(data),
               '--output', str(run_dir / 'model'), '--overwrite',
               '--num_iters', str(args.num_iters), '--latent_factors', '32',
               '--rank_k', '0', '--block_size', str(args.block_size),
               '--exchange', 'broadcast', *mp]
    hog = _hog(args.hog_gib)
    spinners = _spinners(args.cpu_hogs)
    peak, stop = [0], threading.Event()
    started = time.time()
    try:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        sampler = threading.Thread(target=_sample_rss, args=(proc, peak, stop), daemon=True)
        sampler.start()
        log = proc.communicate()[0]
        stop.set()
        sampler.join()
    finally:
        for q in ([hog] if hog is not None else []) + spinners:
            q.kill()
            q.wait()
    (run_dir / 'log.txt').write_text(log)
    r = {'size': size, 'run': index, 'mode': args.mode, 'exit': proc.returncode,
         'wall': round(time.time() - started, 1), 'peak_gib': peak[0] / 2**30,
         'expected': int(expected.sum())}
    if args.mode == 'train':
        r['beam_fix'] = (code / 'pipeline' / 'runners' / 'beam_fixes.py').exists()
        guard = 'the column blocks hold' in log or 'the row blocks hold' in log
        r['lost'] = guard
        r['error'] = ('' if proc.returncode == 0 else
                      next((ln for ln in log.splitlines() if ln.startswith('error:')),
                           log.strip().splitlines()[-1] if log.strip() else '?'))
        if proc.returncode == 0:
            m = json.loads(next((run_dir / 'model').glob('metrics.json')).read_text()) \
                if (run_dir / 'model' / 'metrics.json').exists() else {}
            r['seen'] = {'rows': m.get('train_ratings')}
        return r
    if proc.returncode != 0:
        r['error'] = log.strip().splitlines()[-1] if log.strip() else '?'
        r['lost'] = None
        return r
    res = json.loads((run_dir / 'result.json').read_text())
    disk = pieces_on_disk(run_dir / 'blocks', args.block_size, expected.shape)
    c = res['counters']
    r['seen'] = {'rows': int(disk['rows'].sum()), 'sent': c['col_piece_ratings_sent'],
                 'received': c['col_piece_ratings_received'],
                 'cols': int(disk['col_pieces'].sum()), 'counted': res['counted']}
    r['pieces'] = {'expected': int((expected > 0).sum()), 'sent': c['col_pieces_sent'],
                   'received': c['col_pieces_received']}
    r['blocks_built'] = {'rows': c['row_blocks_built'], 'cols': c['col_blocks_built'],
                         'expected_rows': expected.shape[0], 'expected_cols': expected.shape[1]}
    r['ratings_summary'] = res['ratings']
    r['beam_fix'] = res.get('beam_fix', False)
    diff = disk['col_pieces'] - expected
    r['missing_pieces'] = [(int(a), int(b), int(diff[a, b]))
                           for a, b in zip(*np.nonzero(diff))]
    if (run_dir / 'runner_trace.jsonl').exists():
        import runner_trace
        r['flatten_bundles'] = runner_trace.flatten_bundles(str(run_dir / 'runner_trace.jsonl'))
    ledger = _read_ledger(run_dir / 'ledger')
    r['duplicate_blocks'] = {side: sorted(k for k, n in ledger[side].items() if n > 1)
                             for side in ('row', 'col')}
    r['lost'] = (any(v != r['expected'] for v in r['seen'].values())
                 or r['pieces']['sent'] != r['pieces']['received']
                 or bool(r['missing_pieces'])
                 or any(r['duplicate_blocks'].values())
                 or bool(r.get('flatten_bundles', (0, 0))[1]))
    if not r['lost'] and not args.keep:
        subprocess.run(['rm', '-rf', str(run_dir / 'blocks')], check=True)
    return r


def _read_ledger(folder: pathlib.Path) -> dict:
    out = {'row': {}, 'col': {}}
    for f in folder.glob('*.jsonl'):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            out[e['side']][e['block']] = out[e['side']].get(e['block'], 0) + 1
    return out


def _commit() -> str:
    try:
        sha = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return sha + (' (uncommitted changes)' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def table(args, runs: list, command: str, load0: float, load1: float) -> str:
    import apache_beam
    mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
    lines = [
        f'## {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, commit {_commit()}'
        + (f', stages of {args.code}' if args.code else ''), '',
        f'Command: `{command}`', '',
        f'Machine: {os.cpu_count()} CPUs, {mem:.0f} GiB, load average {load0:.1f} at start, '
        f'{load1:.1f} at end (shared); python {platform.python_version()}, apache-beam '
        f'{apache_beam.__version__}, DirectRunner multi_processing, {args.workers} workers; '
        f'--block_size {args.block_size}; mode {args.mode}'
        + (f' (--num_iters {args.num_iters})' if args.mode == 'train' else '')
        + f'; WALS_BLOCK_CACHE_MB {args.cache_mb or "default (4096)"}; memory hog '
        f'{args.hog_gib:g} GiB; CPU-burning processes {args.cpu_hogs}.', '',
        '| size | run | exit | wall s | peak RSS GiB (all processes) | data-plane fix | '
        'expected training ratings | rows | sent | received | cols | counted | '
        'pieces sent / received | lost or repeated |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in runs:
        seen = r.get('seen') or {}
        cells = [f'{seen[s]:,}' if seen.get(s) is not None else '' for s in STAGES]
        pieces = r.get('pieces')
        ps = f'{pieces["sent"]:,} / {pieces["received"]:,}' if pieces else ''
        lost = {True: '**YES**', False: 'no', None: 'error'}[r.get('lost')]
        if r.get('error'):
            lost += f' ({r["error"][:120]})'
        fix = {True: 'on', False: 'off'}.get(r.get('beam_fix'), '')
        lines.append(f'| {r["size"]} | {r["run"]} | {r["exit"]} | {r["wall"]:.0f} | '
                     f'{r["peak_gib"]:.1f} | {fix} | {r["expected"]:,} | ' + ' | '.join(cells)
                     + f' | {ps} | {lost} |')
    lines.append('')
    by_size: dict = {}
    for r in runs:
        by_size.setdefault(r['size'], []).append(r)
    for size, rs in by_size.items():
        hits = [r['run'] for r in rs if r.get('lost')]
        first = f'first at run {hits[0]}' if hits else 'not reproduced'
        traced = [r['flatten_bundles'] for r in rs if 'flatten_bundles' in r]
        trace = (f'; traced: {sum(t[1] for t in traced)} of {sum(t[0] for t in traced)} '
                 'bundles of data-only stages stored other than they were sent'
                 if traced else '')
        lines.append(f'- {size}: {len(rs)} run(s), {len(hits)} reproduction(s) ({first}){trace}.')
    for r in runs:
        if r.get('lost'):
            lines.append(f'- {r["size"]} run {r["run"]}: missing pieces (row block, column '
                         f'block, difference) {r.get("missing_pieces")}; blocks built twice '
                         f'{r.get("duplicate_blocks")}; blocks built {r.get("blocks_built")}.')
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--sizes', nargs='+', default=['20m'], choices=['1m', '10m', '20m'])
    ap.add_argument('--runs', type=int, default=3, help='runs per size')
    ap.add_argument('--mode', choices=['blocks', 'train'], default='blocks')
    ap.add_argument('--num_iters', type=int, default=4, help='train mode only')
    ap.add_argument('--block_size', type=int, default=4096)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--cache_mb', type=int, default=0, help='WALS_BLOCK_CACHE_MB (0: default)')
    ap.add_argument('--hog_gib', type=float, default=0.0)
    ap.add_argument('--cpu_hogs', type=int, default=0,
                    help='processes that burn CPU during each run (load)')
    ap.add_argument('--code', help='run the stages of this git revision (default: the '
                    'working tree)')
    ap.add_argument('--until_lost', action='store_true', help='stop at the first reproduction')
    ap.add_argument('--trace_runner', action='store_true',
                    help='blocks mode: count elements in the runner\'s buffers '
                         '(bench/runner_trace.py; slower)')
    ap.add_argument('--no_beam_fix', action='store_true',
                    help='blocks mode: do not apply pipeline/runners/beam_fixes.py (every '
                         'command does)')
    ap.add_argument('--keep', action='store_true', help='keep the block files of good runs')
    ap.add_argument('--no_write', action='store_true', help='print, do not write results')
    # the child process
    ap.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--input', help=argparse.SUPPRESS)
    ap.add_argument('--run_dir', help=argparse.SUPPRESS)
    ap.add_argument('--running_mode', default='multi_processing', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    command = 'python bench/stress_multiprocessing.py ' + ' '.join(sys.argv[1:] if argv is None
                                                                   else argv)
    load0 = os.getloadavg()[0]
    runs = []
    for size in args.sizes:
        expected = expected_pieces(size, args.block_size)
        for i in range(1, args.runs + 1):
            print(f'[stress] {size} {args.mode} run {i}/{args.runs} ...', flush=True)
            r = run_once(args, size, i, expected)
            runs.append(r)
            print(f'[stress] {json.dumps(r, default=str)}', flush=True)
            if r.get('lost') and args.until_lost:
                break
    text = table(args, runs, command, load0, os.getloadavg()[0])
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(exist_ok=True)
        head = '# Stress: the block build under multi_processing\n\n'
        old = RESULTS.read_text() if RESULTS.exists() else ''
        old = old[len(head):] if old.startswith(head) else old
        RESULTS.write_text(head + text + ('\n' + old if old else ''))
    return 1 if any(r.get('lost') for r in runs) else 0


if __name__ == '__main__':
    sys.exit(main())

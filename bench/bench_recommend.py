"""Benchmark of batch recommendations (issue 10): top-10 for every user of the 10m
synthetic set (69,878 users × 10,677 items), seen items excluded, in one run:

  (a) kernel    wals_core.topk.top_k on the model's factors and seen items
  (b) implicit  implicit 0.7.2's batch recommend(all users, N=10,
                filter_already_liked_items=True) on the same factors (bench_topk's
                harness: BLAS pinned to one thread, --threads worker threads)
  (c) pipeline  python -m pipeline.recommend (DirectRunner): verify and read the
                model folder -> sharded files (Parquet, and JSON Lines), published
  (d) Spark     ALSModel.recommendForAllUsers(10) + Parquet write, local[2], on the
                same factors (no seen filtering: Spark has none)

    bench/setup_env.sh                                  # bench/.venv (implicit, pyspark)
    bench/.venv/bin/python bench/bench_recommend.py     # writes bench/results/recommend.md
                                                        # and its section of BENCHMARKS.md

The model is trained once by the trainer (wals, --latent_factors 10, --num_iters 10)
and cached in output/bench-recommend/ (retrained when the data file changes).
Targets: kernel <= 0.5 × implicit; pipeline <= 0.5 × Spark (wall, same run).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))

from bench_topk import agreement, implicit_recommend, timed  # noqa: E402
from prepare_data import paths, prepare  # noqa: E402
from run_bench import write_section  # noqa: E402
from pipeline.store.model_files import load_model_files  # noqa: E402
from wals_core.topk import top_k  # noqa: E402

CACHE = ROOT / 'output' / 'bench-recommend'


def load() -> float:
    return os.getloadavg()[0]


def ensure_model(data: str, k: int, iters: int) -> pathlib.Path:
    """The trainer's model of the data set, trained once (cached)."""
    raw = paths(data)['raw']
    if not raw.exists():
        prepare(data)
    model = CACHE / f'model-{data}-k{k}-it{iters}'
    success = model / '_SUCCESS'
    if success.exists():
        inputs = json.loads(success.read_text()).get('inputs', [])
        if [i.get('size_bytes') for i in inputs] == [raw.stat().st_size]:
            return model
    print(f'[model] training {model} (wals, k={k}, {iters} iterations)', flush=True)
    subprocess.run([sys.executable, '-m', 'pipeline.train', '--input', str(raw),
                    '--output', str(model), '--latent_factors', str(k), '--num_iters',
                    str(iters), '--overwrite'], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return model


def run_pipeline(model: pathlib.Path, out: pathlib.Path, fmt: str, n: int) -> dict:
    """python -m pipeline.recommend as a user runs it: (command wall, the launcher's
    own phase times from metrics.json)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'pipeline.recommend', '--model', str(model),
                    '--output', str(out), '--format', fmt, '--top_k', str(n),
                    '--overwrite'], cwd=ROOT, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t
    metrics = json.loads((out / 'metrics.json').read_text())
    return {'command_wall': wall, **metrics['phase_seconds']}


def spark_recommend(files, n: int, work: pathlib.Path, threads: int) -> dict:
    """recommendForAllUsers(n) + Parquet write on an ALSModel holding our factors
    (a tiny fitted model saved, its factor tables replaced, loaded back)."""
    import pandas as pd
    from pyspark.ml.recommendation import ALS, ALSModel
    from pyspark.sql import SparkSession
    t = time.perf_counter()
    spark = (SparkSession.builder.master(f'local[{threads}]').appName('bench-recommend')
             .config('spark.driver.memory', '4g').config('spark.ui.enabled', 'false')
             .config('spark.ui.showConsoleProgress', 'false')
             .config('spark.sql.shuffle.partitions', str(4 * threads))
             .config('spark.sql.execution.arrow.pyspark.enabled', 'true').getOrCreate())
    spark.sparkContext.setLogLevel('ERROR')
    startup = time.perf_counter() - t
    k = files.row.shape[1]
    path = work / 'spark_model'
    shutil.rmtree(work, ignore_errors=True)
    tiny = spark.createDataFrame([(0, 0, 1.0), (1, 1, 2.0), (0, 1, 3.0)],
                                 ['user', 'item', 'rating'])
    ALS(rank=k, maxIter=1, seed=0).fit(tiny).write().overwrite().save(str(path))
    for name, m in (('userFactors', files.row), ('itemFactors', files.col)):
        frame = pd.DataFrame({'id': np.arange(len(m), dtype=np.int32),
                              'features': list(np.asarray(m, np.float32))})
        spark.createDataFrame(frame, 'id int, features array<float>') \
            .write.mode('overwrite').parquet(str(path / name))
    model = ALSModel.load(str(path))
    out = work / 'spark_recs'
    t = time.perf_counter()
    model.recommendForAllUsers(n).write.mode('overwrite').parquet(str(out))
    wall = time.perf_counter() - t
    import pyspark
    version = pyspark.__version__
    spark.stop()
    return {'wall': wall, 'startup': startup, 'version': version}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--data', default='10m')
    ap.add_argument('--factors', type=int, default=10)
    ap.add_argument('--iters', type=int, default=10)
    ap.add_argument('--n', type=int, default=10, help='items per user')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--repeat', type=int, default=2, help='runs of (a) and (b): best wall')
    ap.add_argument('--no-spark', action='store_true')
    ap.add_argument('--no-write', action='store_true')
    args = ap.parse_args(argv)

    model_dir = ensure_model(args.data, args.factors, args.iters)
    t = time.perf_counter()
    files = load_model_files(str(model_dir))
    indptr, indices = files.load_seen()
    load_s = time.perf_counter() - t
    n_users, n_items = files.row.shape[0], files.col.shape[0]
    print(f'{args.data}: {n_users} users × {n_items} items, k={files.row.shape[1]}, '
          f'{len(indices)} seen pairs; model loaded and verified in {load_s:.2f} s',
          flush=True)
    rows = []   # (name, wall, cpu, load, note)

    la = load()
    w, c, (ids, _) = timed(lambda: top_k(files.row, files.col, args.n, exclude_indptr=indptr,
                                         exclude_indices=indices,
                                         num_threads=args.threads), args.repeat)
    rows.append(('(a) top_k kernel', w, c, la, f'{args.threads} threads'))
    print(f'  kernel    {w:7.2f} s wall {c:7.2f} s CPU (load {la:.1f})', flush=True)

    import scipy.sparse
    ui = scipy.sparse.csr_matrix((np.ones(len(indices), np.float32), indices, indptr),
                                 shape=(n_users, n_items))
    la = load()
    w, c, (iids, _) = timed(lambda: implicit_recommend(files.row, files.col, args.n, ui,
                                                       args.threads, True), args.repeat)
    import implicit
    rows.append(('(b) implicit recommend', w, c, la,
                 f'implicit {implicit.__version__}, same ids as kernel: '
                 f'{agreement(iids, ids):.5f}'))
    print(f'  implicit  {w:7.2f} s wall {c:7.2f} s CPU (load {la:.1f})', flush=True)


    pipe = {}
    for fmt in ('parquet', 'jsonl'):
        la = load()
        r = run_pipeline(model_dir, CACHE / f'recs-{fmt}', fmt, args.n)
        pipe[fmt] = r
        rows.append((f'(c) pipeline, {fmt}', r['total'], None, la,
                     f'command {r["command_wall"]:.2f} s incl. interpreter and Beam '
                     f'import; load+verify {r["load_model"]:.2f} s, pipeline '
                     f'{r["pipeline"]:.2f} s (shard work {r["shard_work"]:.2f} s)'))
        print(f'  pipeline {fmt:8s} {r["total"]:6.2f} s (command {r["command_wall"]:.2f} s, '
              f'load {la:.1f})', flush=True)

    spark = None
    if not args.no_spark:
        la = load()
        spark = spark_recommend(files, args.n, CACHE / 'spark', args.threads)
        rows.append(('(d) Spark recommendForAllUsers + Parquet', spark['wall'], None, la,
                     f'pyspark {spark["version"]}, local[{args.threads}], no seen '
                     f'filtering; session start {spark["startup"]:.1f} s not counted'))
        print(f'  spark     {spark["wall"]:7.2f} s (load {la:.1f})', flush=True)

    kernel, imp = rows[0][1], rows[1][1]
    targets = [('kernel ≤ 0.5 × implicit', kernel / imp)]
    if spark:
        targets.append(('pipeline (Parquet) ≤ 0.5 × Spark', pipe['parquet']['total']
                        / spark['wall']))
        targets.append(('pipeline (Parquet), whole command ≤ 0.5 × Spark',
                        pipe['parquet']['command_wall'] / spark['wall']))
    lines = [
        '## Batch recommendations (bench/bench_recommend.py)', '',
        f'Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python '
        f'{platform.python_version()}, numpy {np.__version__}. Data: {args.data} synthetic '
        f'set, {n_users:,} users × {n_items:,} items; model trained by the trainer '
        f'(wals, k={files.row.shape[1]}, {args.iters} iterations); top {args.n} for every '
        f'user, {len(indices):,} seen pairs excluded (except Spark, which cannot).',
        'Command: `' + ' '.join(['bench/.venv/bin/python bench/bench_recommend.py',
                                 *(argv if argv is not None else sys.argv[1:])]) + '`',
        f'(a) and (b): best wall of {args.repeat} runs with that run\'s process CPU; (c): '
        'the launcher\'s own total (verify + read the model, build and run the Beam '
        'graph, write and publish the shards), from its metrics.json; (d): '
        'recommendForAllUsers + write, after the session started. `load`: 1-minute load '
        'average before the step (shared 2-core machine).', '',
        '| step | wall s | CPU s | load | notes |', '|---|---:|---:|---:|---|',
    ]
    for name, w, c, la, note in rows:
        lines.append(f'| {name} | {w:.2f} | {"-" if c is None else f"{c:.2f}"} | {la:.1f} '
                     f'| {note} |')
    lines += ['', '| target | ratio | result |', '|---|---:|---|']
    for name, ratio in targets:
        lines.append(f'| {name} | {ratio:.2f}× | {"PASS" if ratio <= 0.5 else "MISS"} |')
    text = '\n'.join(lines) + '\n'
    print(text)
    if not args.no_write:
        out = ROOT / 'bench' / 'results' / 'recommend.md'
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        write_section(ROOT / 'BENCHMARKS.md', 'recommend', text)
        print(f'wrote {out} and its section of BENCHMARKS.md')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""The same numbers for any BLAS thread count (docs/determinism.md).

Every command runs twice in separate processes, under OPENBLAS_NUM_THREADS =
OMP_NUM_THREADS = MKL_NUM_THREADS = 1 and = 2, and every output file is compared
byte for byte (metrics.json, report.json and _SUCCESS without wall-clock fields and
paths, as scripts/check_unchanged.py compares them): the model files, the metrics with
the convergence history and the --tolerance stop, the comparison with a previous
model and the gate, batch recommendations, and the tuner's trials and choice.

The data is sized so that the old code's BLAS reductions did differ between 1 and 2
threads (OpenBLAS threads a dot product only above 10,000 elements): one row block
of 12,000 users with ~108k training and ~12k test ratings, and over 10,000
validation pairs in the tuner. test_blas_threads_change_a_dot_product_of_this_size
checks that premise on the machine at hand.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline.io.synth import generate_ratings, write_movielens
from tests.conftest import ROOT, assert_same_outputs

THREADS = (1, 2)
TRAIN = ('--num_iters', '6', '--latent_factors', '4', '--tolerance', '2e-3',
         '--eval_every', '1')


def _env(threads: int) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS=str(threads),
                OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def run_both(argv_of, cwd) -> None:
    """`python ARGV` once per thread count, side by side in separate processes;
    argv_of(threads) gives the arguments."""
    procs = [subprocess.Popen([sys.executable, *argv_of(n)], cwd=cwd, env=_env(n),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in THREADS]
    for n, p in zip(THREADS, procs):
        out, _ = p.communicate(timeout=600)
        assert p.returncode in (0, 3), f'{n} thread(s): exit {p.returncode}\n{out[-3000:]}'


def assert_same_files(tmp_path, name: str) -> dict:
    """The two runs' outputs tmp_path/NAME-1, NAME-2 hash the same, file by file."""
    one, two = (tmp_path / f'{name}-{n}' for n in THREADS)
    return assert_same_outputs(one, two)


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """The ratings (12,000 users x 3,000 items, 120k ratings), and a previous explicit
    model trained on 90 % of them (the comparison and the gate)."""
    folder = tmp_path_factory.mktemp('threads')
    users, items, ratings, stamps = generate_ratings(12_000, 3_000, 120_000, seed=3)
    write_movielens(str(folder / 'ratings.tsv'), users, items, ratings, stamps)
    old = np.random.default_rng(4).random(len(users)) < 0.9
    write_movielens(str(folder / 'old.tsv'), users[old], items[old], ratings[old],
                    stamps[old])
    proc = subprocess.run([sys.executable, '-m', 'pipeline.train', '--input', 'old.tsv',
                           '--output', 'previous', '--model', 'explicit', *TRAIN],
                          cwd=folder, env=_env(1), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def test_blas_threads_change_a_dot_product_of_this_size():
    """The premise: with 2 threads OpenBLAS sums a dot product of this data's size
    in another order than with 1 (else this module could not catch a BLAS sum)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip('one CPU: the BLAS runs one thread whatever it is told')
    probe = ('import numpy as np; x = np.random.default_rng(0).normal(size=108_000); '
             'print(repr(float(x @ x)))')
    got = [subprocess.run([sys.executable, '-c', probe], env=_env(n), capture_output=True,
                          text=True, check=True).stdout for n in THREADS]
    assert got[0] != got[1], 'this BLAS sums alike on 1 and 2 threads'


# The reductions of wals_core on a reported path, on inputs large enough that BLAS
# threads them (in the pipeline some are small next to the sum they join, so their
# last bits could hide there): printed at full precision.
CORE_PROBE = """
import numpy as np
from wals_core import metrics, objectives
from wals_core.params import WalsParams
from wals_core.sparse import csr_from_triples
rng = np.random.default_rng(0)
n_rows, n_cols, nnz = 30_000, 20_000, 150_000
keys = rng.choice(n_rows * n_cols, nnz, replace=False)
rows, cols = keys // n_cols, keys % n_cols
values = rng.integers(1, 6, nnz).astype(np.float64)
block = csr_from_triples(rows, cols, values, n_rows)
counts = np.bincount(cols, minlength=n_cols)
out = [objectives.count_norm(counts, rng.normal(size=(n_cols, 5)).astype(np.float32))]
for model in ('wals', 'implicit', 'explicit'):
    p = WalsParams(model=model, latent_factors=4)
    w = objectives.stored_width(p)
    u = rng.normal(size=(n_rows, w)).astype(np.float32)
    v = rng.normal(size=(n_cols, w)).astype(np.float32)
    out += objectives.block_objective(block, 0, u, v, p, counts, 3.0)
    out.append(metrics.squared_error(block.row_of_entry(), block.indices, block.values,
                                     u[:, :4], v[:, :4]))
print(repr(out))
"""


def test_core_reductions_are_identical_for_any_thread_count():
    got = [subprocess.run([sys.executable, '-c', CORE_PROBE], env=_env(n), cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
           for n in THREADS]
    assert got[0] == got[1]


@pytest.mark.parametrize('model', ['wals', 'implicit', 'explicit'])
def test_training_is_byte_identical_for_any_thread_count(work, tmp_path, model):
    """Model files, metrics.json (history, --tolerance stop, test metrics every
    iteration), report.json and the plot; for explicit also the comparison with a
    previous model and the --max_regression gate."""
    extra = ['--previous_model', str(work / 'previous'), '--max_regression', '0.001'] \
        if model == 'explicit' else []
    run_both(lambda n: ['-m', 'pipeline.train', '--input', str(work / 'ratings.tsv'),
                        '--output', str(tmp_path / f'out-{n}'), '--model', model, *TRAIN,
                        *extra], tmp_path)
    files = assert_same_files(tmp_path, 'out')
    assert any(f.startswith('model/') for f in files) and 'metrics.json' in files
    metrics = json.loads((tmp_path / 'out-1' / 'metrics.json').read_text())
    assert len(metrics['history']) == 6
    assert any('test' in h for h in metrics['history'])
    if model == 'explicit':
        assert metrics['comparison']['pairs'] > 10_000
        assert 'report.json' in files


def test_recommendations_are_byte_identical_for_any_thread_count(work, tmp_path):
    run_both(lambda n: ['-m', 'pipeline.recommend', '--model', str(work / 'previous'),
                        '--output', str(tmp_path / f'rec-{n}')], tmp_path)
    files = assert_same_files(tmp_path, 'rec')
    assert any(f.startswith('recommendations-') for f in files)


def test_tuner_trials_and_choice_are_identical_for_any_thread_count(work, tmp_path):
    """Trials run in threads that share one process-wide BLAS thread limit; over
    10,000 validation pairs each."""
    run_both(lambda n: ['-m', 'pipeline.tune', '--input', str(work / 'ratings.tsv'),
                        '--output', str(tmp_path / f'tune-{n}'), '--model', 'explicit',
                        '--metric', 'rmse', '--trials', '4', '--parallel', '2',
                        '--num_iters', '3', '--validation_fraction', '0.2'], tmp_path)
    files = assert_same_files(tmp_path, 'tune')
    assert {'trials.csv', 'best.json'} <= set(files)
    table = pd.read_csv(tmp_path / 'tune-1' / 'trials.csv')
    assert (table['state'] == 'complete').all() and table['rmse'].nunique() == 4
    best = json.loads((tmp_path / 'tune-1' / 'best.json').read_text())
    assert best['data']['validation_ratings'] > 10_000
    assert best['value'] == table['rmse'].min()
    assert np.isfinite(best['value'])


def test_parsed_ratings_are_identical_for_any_arrow_thread_count(monkeypatch):
    """pyarrow parses a range's blocks on its thread pool (pipeline/io/parse.py): the
    chunk must be the line parser's, whatever the pool's size and the block cut."""
    import pyarrow as pa
    from pipeline.io import parse
    rng = np.random.default_rng(3)
    n = 60_000
    text = ''.join(f'{u}\t{i}\t{v}\t0\n' for u, i, v in zip(
        rng.integers(1, 5000, n), rng.integers(1, 900, n), rng.integers(1, 6, n))).encode()
    fmt = parse.LineFormat('\t')
    want = parse.parse_lines(text, 'f', 0, fmt)
    monkeypatch.setattr(parse, '_ARROW_BLOCK_BYTES', 1 << 16)
    assert parse._read_table(text, '\t', 4, (0, 1, 2)).column(0).num_chunks > 4
    before = pa.cpu_count()
    try:
        for threads in (1, 2, 8):
            pa.set_cpu_count(threads)
            got = parse._parse_columnar(text, 'f', 0, fmt)
            assert got is not None, 'the columnar parser declined a clean range'
            for field in ('user_codes', 'user_ids', 'item_codes', 'item_ids', 'values'):
                assert np.array_equal(getattr(got, field), getattr(want, field)), \
                    (threads, field)
            assert got.counts == want.counts
    finally:
        pa.set_cpu_count(before)

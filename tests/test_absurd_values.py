"""A value that silently collapses the model (issue 18 §3): values beyond
--max_abs_value are bad lines (out_of_range); every model is checked before it is
published (in the pipeline) and again in the gate (on the staged files); a model
that fails is never published, and the command exits with code 4 saying which
check failed and for how many rows. Legitimate models pass."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pipeline.errors import EXIT_MODEL_CHECK, ModelCheckError
from pipeline.io.parse import LineFormat, _parse_columnar, parse_lines
from pipeline.store.model_check import check_saved_model
from pipeline.store.model_files import read_model
from pipeline.store.publish import SUCCESS
from pipeline.store.report import gate_decision
from tests.conftest import ROOT, write_ratings
from tests.pipeline_support import load_metrics, make_config, run_pipeline
from wals_core.model_check import check_rows, target_entries, target_rows
from wals_core.params import WalsParams


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'pipeline.train', *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=900)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if re.match(r'(python -m pipeline\.\w+: )?error: ', line)]


def with_line(src, dest, line: str):
    dest.write_text(src.read_text() + line + '\n')
    return dest


# --- (a) out_of_range ----------------------------------------------------------------

def test_values_beyond_the_limit_are_bad_lines_out_of_range():
    fmt = LineFormat('\t', max_abs_value=1e9)
    data = b'1\t1\t1e9\n2\t2\t-1e9\n3\t3\t1e20\n4\t4\t-2e9\n5\t5\t4\n'
    assert _parse_columnar(data, 'f', 0, fmt) is None     # left to the line parser
    chunk = parse_lines(data, 'f', 0, fmt)
    assert [(b.index, b.reason) for b in chunk.bad] == [(2, 'out_of_range'),
                                                        (3, 'out_of_range')]
    assert chunk.values.tolist() == [1e9, -1e9, 4.0]
    assert chunk.counts['bad:out_of_range'] == 2 and chunk.counts['kept'] == 3
    # A settable limit; a clean range still takes the fast path, with the same answer.
    small = LineFormat('\t', max_abs_value=10)
    assert [b.reason for b in parse_lines(b'1\t1\t11\n', 'f', 0, small).bad] == ['out_of_range']
    fast = _parse_columnar(b'1\t1\t10\n2\t2\t-10\n', 'f', 0, small)
    assert fast is not None and fast.values.tolist() == [10.0, -10.0]


def test_an_out_of_range_value_counts_toward_max_bad_fraction(small_ratings, tmp_path):
    src = with_line(small_ratings, tmp_path / 'r.tsv', '7\t7\t1e20\t0')
    metrics = run_pipeline(src, tmp_path / 'out', '--num_iters', '1')
    assert metrics['lines']['bad_by_reason'] == {'out_of_range': 1}
    errors = [json.loads(line) for f in (tmp_path / 'out' / 'errors').glob('*.jsonl')
              for line in f.read_text().splitlines()]
    assert [(e['line'], e['reason']) for e in errors] == [(3001, 'out_of_range')]
    proc = train('--input', str(src), '--output', str(tmp_path / 'strict'), '--num_iters',
                 '1', '--max_bad_fraction', '0')
    assert proc.returncode == 1 and 'out_of_range 1' in proc.stderr
    assert not (tmp_path / 'strict').exists()


# --- (b) the model check ---------------------------------------------------------------

def test_one_extreme_rating_that_collapses_the_model_is_never_published(ml100k, tmp_path):
    """Before: exit 0, 96 item vectors with ratings exactly zero, promoted."""
    src = with_line(ml100k, tmp_path / 'ml.tsv', '1\t1\t1e20\t0')
    out = tmp_path / 'out'
    proc = train('--input', str(src), '--output', str(out), '--num_iters', '2',
                 '--max_abs_value', '1e21')
    assert proc.returncode == EXIT_MODEL_CHECK, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    (error,) = error_lines(proc.stderr)
    assert re.search(r'[\d,]+ of the [\d,]+ items with training ratings have an all-zero '
                     r'vector', error), error
    assert not out.exists() and not list(tmp_path.glob('out.tmp-*'))


def test_an_overflowing_rating_is_a_model_check_error_not_a_traceback(small_ratings, tmp_path):
    """Before: a LinAlgError traceback."""
    src = with_line(small_ratings, tmp_path / 'r.tsv', '7\t7\t1e300\t0')
    proc = train('--input', str(src), '--output', str(tmp_path / 'out'), '--num_iters', '2',
                 '--max_abs_value', '1e301')
    assert proc.returncode == EXIT_MODEL_CHECK, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr and len(error_lines(proc.stderr)) == 1
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('model', ['implicit', 'wals'])
def test_an_input_without_a_target_gives_no_model(tmp_path, model):
    """--model implicit on values that are all 0 (before: an all-zero model, exit 0)."""
    rng = np.random.default_rng(1)
    pairs = rng.choice(40 * 30, 300, replace=False)
    src = write_ratings(tmp_path / 'zeros.tsv', pairs // 30, pairs % 30, np.zeros(300, int))
    with pytest.raises(ModelCheckError, match='every vector is zero'):
        run_pipeline(src, tmp_path / 'out', '--num_iters', '2', '--model', model)
    assert not (tmp_path / 'out').exists()


LEGITIMATE = [
    ('wals', []), ('implicit', []), ('explicit', []),
    ('wals', ['--weights', 'false']), ('wals', ['--num_iters', '1']),
    ('wals', ['--num_iters', '0']), ('implicit', ['--num_iters', '1']),
    ('explicit', ['--regularization', '1000']),                  # tiny factors
    ('wals', ['--latent_factors', '40', '--regularization', '0', '--unobs_weight', '0']),
]


@pytest.mark.parametrize('model, extra', LEGITIMATE, ids=[f'{m}{"".join(e)}'
                                                         for m, e in LEGITIMATE])
def test_legitimate_models_pass(small_ratings, tmp_path, model, extra):
    """Including rows whose ratings have no target (wals, implicit): a user whose
    ratings are all 0, an item rated only 0."""
    lines = ['zero_user\t1\t0\t0', 'zero_user\t2\t0\t0', '1\tzero_item\t0\t0',
             '2\tzero_item\t0\t0']
    src = tmp_path / 'r.tsv'
    src.write_text(small_ratings.read_text() + '\n'.join(lines) + '\n')
    run_pipeline(src, tmp_path / 'out', '--num_iters', '3', '--model', model, *extra)
    model_files = read_model(str(tmp_path / 'out'))
    assert np.all(np.isfinite(model_files['row'])) and np.all(np.isfinite(model_files['col']))


def test_movielens_passes_the_check_with_every_model(ml100k, tmp_path):
    for model in ('wals', 'implicit', 'explicit'):
        metrics = run_pipeline(ml100k, tmp_path / model, '--model', model, '--num_iters', '3')
        assert (tmp_path / model / SUCCESS).exists(), model
        assert metrics['lines']['kept'] == 100_000


def test_target_rows_follow_each_objective():
    indptr = np.array([0, 2, 4, 5, 5])
    values = np.array([0.0, 0.0, 3.5, 0.0, 2.0])
    for model, mean, want in (('wals', 0.0, [False, True, True, False]),
                              ('implicit', 0.0, [False, True, True, False]),
                              ('explicit', 2.0, [True, True, False, False])):
        got = target_rows(indptr, values, WalsParams(model=model), mean).tolist()
        assert got == want, model
    check = check_rows(np.array([[0, 0], [1, 0], [0, 0], [np.nan, 1]], np.float32),
                       np.array([True, True, True, False]), start=10)
    assert (check.zero_rows, check.first_zero, check.nonfinite_rows,
            check.first_nonfinite) == (2, 10, 1, 13)


def test_target_rows_on_random_blocks_with_empty_rows():
    rng = np.random.default_rng(3)
    for trial in range(30):
        # some blocks without any entry; rows of 0-3 entries
        counts = rng.integers(0, 4, rng.integers(1, 40)) * (trial % 7 != 0)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        values = rng.choice([0.0, 1.0, 2.5], int(indptr[-1]))
        for model, mean in (('wals', 0.0), ('implicit', 0.0), ('explicit', 1.0)):
            params = WalsParams(model=model)
            want = [bool(np.any(target_entries(values[a:b], params, mean)))
                    for a, b in zip(indptr[:-1], indptr[1:])]
            got = target_rows(indptr, values, params, mean)
            assert got.dtype == bool and got.tolist() == want, (trial, model)


def test_the_gate_checks_the_staged_files_again(small_ratings, tmp_path, monkeypatch):
    """The files about to be published are read back and checked in the gate: here a
    model whose files are damaged after the pipeline's check (a vector of a user
    with ratings zeroed) is refused with exit code 4 and not published."""
    from pipeline.training import run as training_run
    real_remove_tree = training_run.remove_tree

    def damage_the_staged_model(path):
        real_remove_tree(path)
        row = next(tmp_path.glob('out.tmp-*')) / 'model' / 'row.npy'
        matrix = np.load(row)
        matrix[:] = 0
        np.save(row, matrix)

    monkeypatch.setattr(training_run, 'remove_tree', damage_the_staged_model)
    with pytest.raises(ModelCheckError, match='all-zero rows'):
        run_pipeline(small_ratings, tmp_path / 'out', '--num_iters', '1')
    assert not (tmp_path / 'out').exists() and not list(tmp_path.glob('out.tmp-*'))


def test_check_saved_model_and_the_gate_decision(small_ratings, tmp_path):
    out = tmp_path / 'out'
    run_pipeline(small_ratings, out, '--num_iters', '1')
    config = make_config('--input', str(small_ratings), '--output', str(out))
    metrics = load_metrics(out)
    nonzero = {side: int(np.any(np.load(out / 'model' / f'{side}.npy') != 0, axis=1).sum())
               for side in ('row', 'col')}
    facts = {'row': {'rows': 120, 'target_rows': nonzero['row']},
             'col': {'rows': 80, 'target_rows': nonzero['col']}}
    assert check_saved_model(str(out), config.params, facts, metrics) == []
    col = np.load(out / 'model' / 'col.npy')
    col[3, 0] = np.inf
    np.save(out / 'model' / 'col.npy', col)
    metrics['test_rmse'] = float('nan')
    problems = check_saved_model(str(out), config.params, facts, metrics)
    assert problems == [f'1 of 80 items in {out}/model/col.npy have a value that is not a '
                        'finite number', 'the metric test_rmse is nan']
    gate = gate_decision(None, 'rmse', None, problems)
    assert not gate['passed'] and gate['model_check'] == problems
    assert gate_decision(None, 'rmse', None, [])['passed']

"""The Beam pipeline against the in-memory trainer, determinism, and input variants."""
from __future__ import annotations

import gzip

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.io.read import ReadConfig, ReadRatings
from tests.pipeline_support import (load_metrics, load_model, make_config, run_pipeline,
                                    train_in_memory)

MULTI = ['--direct_running_mode=multi_processing', '--direct_num_workers=2']


def assert_same_factors(got, want, rtol=1e-4):
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize('extra', [[], ['--wt_type', 'log', '--latent_factors', '4']])
def test_pipeline_matches_in_memory_trainer(ml100k, tmp_path, extra):
    args = ['--num_iters', '4', '--block_size', '300', *extra]
    metrics = run_pipeline(ml100k, tmp_path / 'out', *args)
    got = load_model(tmp_path / 'out')
    want = train_in_memory(ml100k, make_config('--input', str(ml100k), *args))
    np.testing.assert_array_equal(got['user'], want['user'])
    np.testing.assert_array_equal(got['item'], want['item'])
    assert got['row'].dtype == np.float32 and got['col'].dtype == np.float32
    assert_same_factors(got['row'], want['row'])
    assert_same_factors(got['col'], want['col'])
    assert metrics['train_rmse'] == pytest.approx(want['train_rmse'], abs=1e-5)
    assert metrics['test_rmse'] == pytest.approx(want['test_rmse'], abs=1e-5)
    assert metrics['test_cold_start_ratings'] == want['test_cold_start_ratings']
    assert metrics['train_ratings'] + metrics['test_ratings'] \
        + metrics['test_cold_start_ratings'] == 100000


def test_runs_are_byte_identical_across_runs_and_direct_runner_modes(small_ratings, tmp_path):
    args = ['--num_iters', '3', '--block_size', '16', '--latent_factors', '6']
    run_pipeline(small_ratings, tmp_path / 'a', *args)
    run_pipeline(small_ratings, tmp_path / 'b', *args)
    run_pipeline(small_ratings, tmp_path / 'c', *args, beam_args=MULTI)
    for name in ('user.npy', 'item.npy', 'row.npy', 'col.npy'):
        a = (tmp_path / 'a' / 'model' / name).read_bytes()
        assert a == (tmp_path / 'b' / 'model' / name).read_bytes(), name
        assert a == (tmp_path / 'c' / 'model' / name).read_bytes(), name
    ma, mc = load_metrics(tmp_path / 'a'), load_metrics(tmp_path / 'c')
    assert ma['train_rmse'] == mc['train_rmse'] and ma['test_rmse'] == mc['test_rmse']


def test_block_size_does_not_change_the_model_beyond_float_noise(small_ratings, tmp_path):
    run_pipeline(small_ratings, tmp_path / 'one', '--num_iters', '3', '--block_size', '1000')
    run_pipeline(small_ratings, tmp_path / 'many', '--num_iters', '3', '--block_size', '7')
    one, many = load_model(tmp_path / 'one'), load_model(tmp_path / 'many')
    assert_same_factors(many['row'], one['row'], 1e-5)
    assert_same_factors(many['col'], one['col'], 1e-5)


def test_byte_ranges_read_every_line_exactly_once(tmp_path):
    lines = [f'{u}\t{u % 7}\t{u % 5 + 1}' for u in range(2000)]
    path = tmp_path / 'r.tsv'
    path.write_text('\n'.join(lines))       # no newline at the end either
    cfg = ReadConfig(str(path), '\t', False, 'ratings', split_bytes=97)
    with BeamTestPipeline() as p:
        pairs = (p | ReadRatings(cfg)
                 | beam.FlatMap(lambda c: zip(c.users.tolist(), c.items.tolist())))
        assert_that(pairs, equal_to([(str(u), str(u % 7)) for u in range(2000)]))


def test_gzip_and_glob_inputs_and_string_ids(tmp_path):
    rng = np.random.default_rng(1)
    users = [f'user-{i}' for i in rng.integers(0, 60, 1200)]
    items = [f'item/{i}' for i in rng.integers(0, 40, 1200)]
    rows = sorted({(u, i): r for u, i, r in zip(users, items, rng.integers(1, 6, 1200))}.items())
    text = ''.join(f'{u},{i},{r}\n' for (u, i), r in rows)
    (tmp_path / 'in').mkdir()
    half = len(text) // 2
    cut = text.index('\n', half) + 1
    (tmp_path / 'in' / 'part-1.csv').write_text(text[:cut])
    with gzip.open(tmp_path / 'in' / 'part-2.csv.gz', 'wt') as f:
        f.write(text[cut:])
    metrics = run_pipeline(f'{tmp_path}/in/part-*', tmp_path / 'out', '--delimiter', ',',
                           '--num_iters', '2')
    model = load_model(tmp_path / 'out')
    assert model['user'].dtype.kind == 'U' and len(model['user']) == len({u for (u, _), _ in rows})
    assert model['item'].tolist() == sorted({i for (_, i), _ in rows})
    assert metrics['lines']['kept'] == len(rows)
    assert metrics['train_ratings'] + metrics['test_ratings'] \
        + metrics['test_cold_start_ratings'] == len(rows)


def test_web_views_sum_time_per_pair_and_use_log_weights(tmp_path):
    path = tmp_path / 'views.csv'
    rows = ['visitId,clientId,contentId,timeOnPage']
    rng = np.random.default_rng(3)
    for n in range(1500):
        rows.append(f'{n},c{rng.integers(0, 50)},{rng.integers(100, 140)},{rng.integers(1, 300)}')
    rows.append('9999,c1,100,5')
    rows.append('9998,c1,100,7')
    path.write_text('\n'.join(rows) + '\n')
    metrics = run_pipeline(path, tmp_path / 'out', '--data-type', 'web_views',
                           '--num_iters', '2', '--test_fraction', '0')
    assert metrics['parameters']['wt_type'] == 'log'
    assert metrics['parameters']['delimiter'] == ','
    assert metrics['lines']['skipped_header'] == 1 and metrics['lines']['kept'] == 1502
    pairs = {(r.split(',')[1], r.split(',')[2]) for r in rows[1:]}
    assert metrics['duplicates_merged'] == 1502 - len(pairs)
    assert metrics['train_ratings'] == len(pairs)
    model = load_model(tmp_path / 'out')
    assert model['item'].dtype == np.int64


def test_zero_iterations_writes_the_initial_factors(small_ratings, tmp_path):
    run_pipeline(small_ratings, tmp_path / 'out', '--num_iters', '0', '--latent_factors', '3')
    model = load_model(tmp_path / 'out')
    from wals_core.hashing import id_hashes
    from wals_core.init import initial_factors
    np.testing.assert_array_equal(model['col'], initial_factors(id_hashes(model['item']), 3, 0, 'col'))

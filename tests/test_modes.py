"""--model implicit and explicit through the real Beam pipeline: against the
in-memory trainer, ranking metrics against a naive per-user loop, determinism,
--test_input, and the options of each mode."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.options import ConfigError
from tests.conftest import assert_same_outputs, write_ratings
from tests.pipeline_support import (load_metrics, load_model, make_config, run_pipeline,
                                    train_in_memory)
from tests.test_pipeline import MULTI, assert_same_factors


def naive_ranking(model: dict, train_pairs, test_pairs, k: int, threshold: float,
                  explicit: bool) -> dict:
    """precision/recall/MAP/NDCG@k by a plain loop over users (implicit.evaluation's
    conventions), from the published files."""
    row, col = model['row'].astype(np.float64), model['col'].astype(np.float64)
    seen: dict[int, set] = {}
    for u, i in zip(*train_pairs):
        seen.setdefault(int(u), set()).add(int(i))
    relevant: dict[int, set] = {}
    for u, i, r in zip(*test_pairs):
        if r >= threshold:
            relevant.setdefault(int(u), set()).add(int(i))
    hits = denominator = 0
    ap = ndcg = recall = 0.0
    for u, rel in relevant.items():
        scores = col @ row[u] + (model['col_bias'] if explicit else 0.0)
        ranked = [j for j in np.lexsort((np.arange(len(col)), -scores))
                  if j not in seen.get(u, set())][:k]
        h, user_ap, dcg = 0, 0.0, 0.0
        for pos, j in enumerate(ranked):
            if j in rel:
                h += 1
                user_ap += h / (pos + 1)
                dcg += 1 / np.log2(pos + 2)
        idcg = sum(1 / np.log2(pos + 2) for pos in range(min(k, len(rel))))
        hits += h
        denominator += min(k, len(rel))
        ap += user_ap / min(k, len(rel))
        ndcg += dcg / idcg
        recall += h / len(rel)
    n = len(relevant)
    return {'precision_at_k': hits / denominator, 'map_at_k': ap / n, 'ndcg_at_k': ndcg / n,
            'recall_at_k': recall / n, 'ranking_users': n}


@pytest.mark.parametrize('mode', ['implicit', 'explicit'])
def test_mode_matches_in_memory_trainer_and_naive_ranking(ml100k, tmp_path, mode):
    args = ['--model', mode, '--num_iters', '4', '--block_size', '300']
    metrics = run_pipeline(ml100k, tmp_path / 'out', *args)
    got = load_model(tmp_path / 'out')
    want = train_in_memory(ml100k, make_config('--input', str(ml100k), *args))
    k = {'implicit': 32, 'explicit': 10}[mode]
    assert got['row'].shape == (943, k) and got['col'].shape == (1682, k)
    assert_same_factors(got['row'], want['row'])
    assert_same_factors(got['col'], want['col'])
    assert metrics['model'] == mode and metrics['parameters']['model'] == mode
    if mode == 'explicit':
        assert_same_factors(got['row_bias'], want['row_bias'])
        assert_same_factors(got['col_bias'], want['col_bias'])
        assert float(got['global_mean']) == pytest.approx(want['global_mean'], rel=1e-12)
        assert metrics['test_rmse'] == pytest.approx(want['test_rmse'], abs=1e-5)
        assert metrics['train_rmse'] == pytest.approx(want['train_rmse'], abs=1e-5)
        assert metrics['relevance_threshold'] == pytest.approx(want['global_mean'])
    else:
        assert metrics['test_rmse'] is None and metrics['train_rmse'] is None
        assert metrics['relevance_threshold'] == 0.0
        assert 'row_bias' not in got
    naive = naive_ranking(got, want['train_pairs'], want['test_pairs'], 10,
                          metrics['relevance_threshold'], mode == 'explicit')
    assert metrics['ranking_users'] == naive['ranking_users']
    for key in ('precision_at_k', 'recall_at_k', 'map_at_k', 'ndcg_at_k'):
        # float32 scores in the kernel vs float64 here: a near-tie may swap
        assert metrics[key] == pytest.approx(naive[key], abs=2e-3), key


@pytest.mark.parametrize('mode', ['implicit', 'explicit'])
def test_mode_runs_are_byte_identical_across_direct_runner_modes(small_ratings, tmp_path, mode):
    """in_memory, multi_threading and multi_processing: every output file (metrics
    with the history, the test metrics of every iteration and the --tolerance test,
    to the last bit; JSON without wall-clock fields)."""
    args = ['--model', mode, '--num_iters', '3', '--block_size', '16', '--latent_factors', '4',
            '--tolerance', '1e-9', '--eval_every', '1']
    a = run_pipeline(small_ratings, tmp_path / 'a', *args)
    run_pipeline(small_ratings, tmp_path / 'b', *args,
                 beam_args=['--direct_running_mode', 'multi_threading',
                            '--direct_num_workers', '2'])
    c = run_pipeline(small_ratings, tmp_path / 'c', *args, beam_args=MULTI)
    for other in ('b', 'c'):
        assert_same_outputs(tmp_path / 'a', tmp_path / other)
    assert len(a['history']) == 3 and 'test' in a['history'][0]
    model = tmp_path / 'a' / 'model'
    files = sorted(str(p.relative_to(model)) for p in model.rglob('*') if p.is_file())
    assert len([f for f in files if f.endswith('.npy')]) == (8 if mode == 'explicit' else 5)
    assert len([f for f in files if f.startswith('seen/')]) == 8     # 120 users / 16
    for name in files:
        assert (tmp_path / 'a' / 'model' / name).read_bytes() == \
            (tmp_path / 'c' / 'model' / name).read_bytes(), name
    for key in ('test_rmse', 'precision_at_k', 'ndcg_at_k', 'map_at_k', 'recall_at_k'):
        assert a[key] == c[key], key


def test_test_input_evaluates_on_the_held_out_file(ml100k, tmp_path):
    data = np.loadtxt(ml100k, dtype=np.int64)
    data = data[np.argsort(data[:, 3], kind='stable')]
    cut = int(len(data) * 0.9)
    train_path = write_ratings(tmp_path / 'old.tsv', *data[:cut, :3].T)
    test_rows = [f'{u}\t{i}\t{r}\t0\n' for u, i, r in data[cut:, :3]]
    test_rows += ['99999\t1\t5\t0\n', '1\t99999\t4\t0\n', 'not a rating\n']
    (tmp_path / 'new.tsv').write_text(''.join(test_rows))
    args = ['--model', 'explicit', '--num_iters', '3', '--test_input', str(tmp_path / 'new.tsv'),
            '--max_bad_fraction', '0.01']
    metrics = run_pipeline(train_path, tmp_path / 'out', *args)
    want = train_in_memory(train_path, make_config('--input', str(train_path), *args),
                           test_path=_clean_copy(tmp_path / 'new.tsv', tmp_path / 'clean.tsv'))
    # every line of --input trains; every good line of --test_input is a test pair
    assert metrics['train_ratings'] == cut
    assert metrics['test_ratings'] + metrics['test_cold_start_ratings'] == len(data) - cut + 2
    assert metrics['test_cold_start_ratings'] == want['test_cold_start_ratings']
    assert metrics['test_rmse'] == pytest.approx(want['test_rmse'], abs=1e-5)
    assert metrics['test_lines']['bad'] == 1 and metrics['test_lines']['kept'] == len(data) - cut + 2
    bad = [json.loads(line) for f in (tmp_path / 'out' / 'errors').glob('bad_lines*')
           for line in f.read_text().splitlines()]
    assert [b['file'].endswith('new.tsv') for b in bad] == [True]
    assert bad[0]['line'] == len(data) - cut + 3


def _clean_copy(src, dst):
    dst.write_text(''.join(line + '\n' for line in src.read_text().splitlines()
                           if line.count('\t') == 3))
    return dst


def test_a_pair_in_both_files_is_kept_on_both_sides(tmp_path):
    train = write_ratings(tmp_path / 'a.tsv', [1, 1, 2, 2, 3], [1, 2, 1, 2, 1], [5, 3, 4, 2, 1])
    test = write_ratings(tmp_path / 'b.tsv', [1, 1], [1, 1], [2, 4])   # duplicates: mean 3
    metrics = run_pipeline(train, tmp_path / 'out', '--test_input', str(test),
                           '--num_iters', '1', '--latent_factors', '2', '--model', 'explicit')
    assert metrics['train_ratings'] == 5 and metrics['test_ratings'] == 1
    assert metrics['duplicates_merged'] == 1


def test_mode_defaults_and_parameters_of_other_modes(tmp_path):
    base = ('--input', 'x.tsv', '--output', str(tmp_path / 'o'))
    implicit = make_config(*base, '--model', 'implicit').params
    assert (implicit.latent_factors, implicit.num_iters, implicit.regularization,
            implicit.alpha, implicit.epsilon, implicit.confidence,
            implicit.scale_regularization) == (32, 15, 0.1, 1.0, 1.0, 'log', True)
    plain = make_config(*base, '--model', 'implicit', '--scale_regularization', 'false').params
    assert plain.scale_regularization is False
    with pytest.raises(ConfigError, match='--scale_regularization is a parameter of --model '
                                          'implicit'):
        make_config(*base, '--model', 'explicit', '--scale_regularization', 'true')
    explicit = make_config(*base, '--model', 'explicit', '--latent_factors', '7').params
    assert (explicit.latent_factors, explicit.num_iters, explicit.regularization) == (7, 15, 0.1)
    wals = make_config(*base).params
    assert (wals.model, wals.latent_factors, wals.num_iters, wals.regularization) == \
        ('wals', 5, 20, 0.07)
    with pytest.raises(ConfigError, match='--unobs_weight is a parameter of --model wals'):
        make_config(*base, '--model', 'implicit', '--unobs_weight', '0.1')
    with pytest.raises(ConfigError, match='--alpha is a parameter of --model implicit'):
        make_config(*base, '--model', 'explicit', '--alpha', '3')
    with pytest.raises(ConfigError, match='--use_optimized'):
        make_config(*base, '--model', 'explicit', '--use_optimized')
    with pytest.raises(ConfigError, match='--epsilon'):
        make_config(*base, '--model', 'implicit', '--epsilon', '0')


def test_manifest_records_the_mode_and_every_parameter(small_ratings, tmp_path):
    run_pipeline(small_ratings, tmp_path / 'out', '--model', 'implicit', '--num_iters', '1',
                 '--alpha', '4', '--confidence', 'linear', '--latent_factors', '3')
    manifest = json.loads((tmp_path / 'out' / '_SUCCESS').read_text())
    params = manifest['parameters']
    assert (params['model'], params['alpha'], params['confidence'], params['latent_factors']) \
        == ('implicit', 4.0, 'linear', 3)
    assert params == load_metrics(tmp_path / 'out')['parameters']


def test_seen_items_are_every_rated_pair_of_the_input(small_ratings, tmp_path):
    run_pipeline(small_ratings, tmp_path / 'out', '--num_iters', '0', '--block_size', '50')
    model = load_model(tmp_path / 'out')
    data = np.loadtxt(small_ratings, dtype=np.int64)
    seen = set()
    for part in sorted((tmp_path / 'out' / 'model' / 'seen').glob('part-*.npz')):
        with np.load(part) as z:
            assert z['indices'].dtype == np.int32
            for row in range(len(z['indptr']) - 1):
                items = z['indices'][z['indptr'][row]:z['indptr'][row + 1]]
                assert np.all(np.diff(items) > 0)
                seen |= {(int(model['user'][int(z['start']) + row]), int(model['item'][i]))
                         for i in items}
    assert seen == {(int(u), int(i)) for u, i in data[:, :2]}

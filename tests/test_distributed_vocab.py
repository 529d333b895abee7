"""--vocabulary distributed: the same numbering as finalize_ids, the same model files
as --vocabulary local, and no step that holds every ID before the writer."""
from __future__ import annotations

import pathlib
from collections import Counter

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that

from pipeline.training import distributed_vocab
from pipeline.training.blocks import BlockConfig
from pipeline.training.distributed_vocab import DistributedVocabulary, plan_ranges
from pipeline.io.parse import ParsedChunk, factorize
from pipeline.store.publish import staging_path
from pipeline.training.graph import build_pipeline
from tests.conftest import write_ratings
from tests.pipeline_support import load_metrics, load_model, make_config, run_pipeline
from wals_core.vocab import _is_int64, canonical_int64, finalize_ids, lookup

MULTI = ['--direct_running_mode=multi_processing', '--direct_num_workers=2']


def test_canonical_int64_agrees_with_finalize_ids_rule():
    texts = ['0', '-0', '42', '042', '+4', ' 5', '5 ', '1_000', '٤٢', '1e3', '', 'abc',
             '9223372036854775807', '-9223372036854775807', '-9223372036854775808',
             '9223372036854775808', '99999999999999999999', '-1', '7']
    ok, values = canonical_int64(np.array(texts))
    assert ok.tolist() == [_is_int64(t) for t in texts]
    assert values[ok].tolist() == [int(t) for t, k in zip(texts, ok) if k]
    ok, _ = canonical_int64(np.array(['1', '2', '-3']))   # the vectorized path
    assert ok.all()


@pytest.mark.parametrize('numeric', [True, False])
def test_any_range_plan_orders_ids_as_finalize_ids(numeric):
    rng = np.random.default_rng(3)
    for _ in range(50):
        ids = rng.integers(-50, 50, size=rng.integers(1, 80)).astype(str)
        if not numeric:
            ids = np.char.add(ids, rng.choice(['', 'é', 'x', '10'], size=len(ids)))
            ids[0] = 'x' + ids[0]
        vocab = finalize_ids(ids)
        assert (vocab.dtype.kind == 'i') == numeric
        sample = rng.choice(ids, size=rng.integers(0, len(ids) + 1))
        plan = plan_ranges([sample], numeric, len(ids), int(rng.integers(1, 20)))
        _, keys = plan.keys(vocab.astype(str))
        r = plan.range_of(keys)
        assert np.all(np.diff(r) >= 0)   # ranges are intervals of the global order
        assert len(np.unique(r)) <= plan.num_ranges


def _chunk(users: np.ndarray, items: np.ndarray, first: int, offset: int) -> ParsedChunk:
    uc, uid = factorize(np.asarray(users, dtype=str))
    ic, iid = factorize(np.asarray(items, dtype=str))
    values = np.arange(first, first + len(users), dtype=np.float64)   # the rating's number
    return ParsedChunk(uc, uid, ic, iid, values, Counter(), [], path='p', offset=offset)


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    kind = seed % 3
    n_chunks = int(rng.integers(1, 5))
    chunks, users, items = [], [], []
    for c in range(n_chunks):
        n = 0 if c == 1 else int(rng.integers(1, 60))   # chunk 1 is empty
        if seed == 0:
            u = np.array(['7'] * n)                     # one ID
        elif kind == 0:                                 # canonical ints, ties across chunks
            u = rng.integers(-30, 30, size=n).astype(str)
        elif kind == 1:                                 # mixed: '042' is not canonical
            u = np.char.add(rng.choice(['0', ''], size=n), rng.integers(0, 40, size=n).astype(str))
        else:                                           # unicode, mixed lengths
            u = np.char.add(rng.choice(['ü', 'a', 'ab', '日本', ''], size=n),
                            rng.integers(0, 30, size=n).astype(str))
        i = rng.integers(0, 25, size=n).astype(str)
        chunks.append(_chunk(u, i, len(users), c * 1000))
        users.extend(u.tolist())
        items.extend(i.tolist())
    return chunks, np.array(users, dtype=str), np.array(items, dtype=str)


@pytest.mark.parametrize('seed', range(6))
def test_numbering_equals_finalize_ids(seed):
    chunks, users, items = _random_case(seed)
    want_users, want_items = finalize_ids(users), finalize_ids(items)
    want_rows, want_cols = lookup(want_users, users), lookup(want_items, items)
    config = BlockConfig(block_size=1 << 20, test_fraction=0.0, split_seed=0, duplicates='mean')

    def check_pieces(pieces):
        rows = np.full(len(users), -1)
        cols = np.full(len(users), -1)
        for _, (r, c, v, _) in pieces:
            rows[v.astype(int)], cols[v.astype(int)] = r, c
        assert rows.tolist() == want_rows.tolist()
        assert cols.tolist() == want_cols.tolist()

    def check_vocab(vocabs, want):
        (vocab,) = vocabs
        assert vocab.ids.dtype == want.dtype and vocab.ids.tolist() == want.tolist()
        assert vocab.hashes.tolist() == distributed_vocab.Vocabulary(want).hashes.tolist()

    with beam.Pipeline(options=PipelineOptions([])) as p:
        checked = p | 'Checked' >> beam.Create([None])
        out = (p | beam.Create(chunks)
               | DistributedVocabulary(config, checked, ids_per_range=int(seed % 4 + 1)))
        assert_that(out.pieces, check_pieces, label='Pieces')
        assert_that(out.users, lambda v: check_vocab(v, want_users), label='Users')
        assert_that(out.items, lambda v: check_vocab(v, want_items), label='Items')
        assert_that(out.user_count, lambda c: [len(x) for x in c] == [len(want_users)] or
                    pytest.fail('user count'), label='UserCount')


def _split_files(folder: pathlib.Path, users, items, ratings) -> str:
    """The ratings in three overlapping files and an empty one: several chunks."""
    folder.mkdir()
    n = len(users)
    for f, part in enumerate([slice(0, n // 3), slice(n // 3, 2 * n // 3), slice(2 * n // 3, n)]):
        write_ratings(folder / f'part-{f}.tsv', users[part], items[part], ratings[part])
    (folder / 'part-3.tsv').write_text('')
    return str(folder / 'part-*.tsv')


def _ratings(tmp_path: pathlib.Path, strings: bool) -> str:
    rng = np.random.default_rng(11)
    pairs = rng.choice(150 * 90, size=2500, replace=False)
    users, items = pairs // 90 + 1, pairs % 90 + 1
    if strings:   # mixed lengths, unicode, and numeric-looking text that is not canonical
        prefixes = np.array(['ü', '0', 'user-', '日本語', 'Z'])
        users = np.char.add(prefixes[users % 5], users.astype(str))
        items = np.char.add(np.array(['', 'é', 'item_'])[items % 3], items.astype(str))
        items = np.where(items == '1', '01', items)
    folder = tmp_path / ('strings' if strings else 'ints')
    return _split_files(folder, users, items, rng.integers(1, 6, size=len(pairs)))


FILES = ('user', 'item', 'row', 'col')


@pytest.fixture
def several_ranges(monkeypatch):
    monkeypatch.setattr(distributed_vocab, 'IDS_PER_RANGE', 30)


@pytest.mark.parametrize('strings', [False, True])
@pytest.mark.parametrize('model', ['wals', 'implicit', 'explicit'])
def test_distributed_model_files_equal_local(tmp_path, several_ranges, model, strings):
    data = _ratings(tmp_path, strings)
    args = ('--model', model, '--num_iters', '2', '--block_size', '16')
    local = run_pipeline(data, tmp_path / 'local', *args)
    runs = [('dist', ())] + ([('multi', MULTI)] if model == 'wals' else [])
    want = load_model(tmp_path / 'local')
    assert want['user'].dtype.kind == ('U' if strings else 'i')
    for name, beam_args in runs:
        got = run_pipeline(data, tmp_path / name, *args, '--vocabulary', 'distributed',
                           beam_args=beam_args)
        model_files = load_model(tmp_path / name)
        assert sorted(model_files) == sorted(want)
        for f in want:
            assert model_files[f].dtype == want[f].dtype, f
            assert model_files[f].tobytes() == want[f].tobytes(), f
        for f in FILES:
            assert (tmp_path / name / 'model' / f'{f}.npy').read_bytes() == \
                (tmp_path / 'local' / 'model' / f'{f}.npy').read_bytes(), f
        assert got['test_rmse'] == local['test_rmse']
        assert got['users'] == local['users'] and got['items'] == local['items']


def test_distributed_with_test_input_and_previous_model(tmp_path, several_ranges):
    data = _ratings(tmp_path, strings=True)
    rng = np.random.default_rng(5)
    test = write_ratings(tmp_path / 'test.tsv',
                         np.array(['ü5', 'nobody', '0123', 'user-7', 'Z10', '日本語3']),
                         np.array(['é1', 'item_2', 'é4', 'unknown', '3', 'é7']),
                         rng.integers(1, 6, size=6))
    args = ('--num_iters', '2', '--block_size', '16', '--test_input', str(test))
    local = run_pipeline(data, tmp_path / 'local', *args)
    got = run_pipeline(data, tmp_path / 'dist', *args, '--vocabulary', 'distributed')
    assert local['test_cold_start_ratings'] > 0
    for key in ('test_rmse', 'train_rmse', 'test_cold_start_ratings', 'test_ratings'):
        assert got[key] == local[key], key
    for f in FILES:
        assert (tmp_path / 'dist' / 'model' / f'{f}.npy').read_bytes() == \
            (tmp_path / 'local' / 'model' / f'{f}.npy').read_bytes(), f
    # warm start from the first model, and the comparison with it
    again = ('--num_iters', '1', '--block_size', '16', '--previous_model',
             str(tmp_path / 'local'))
    local = run_pipeline(data, tmp_path / 'local2', *again)
    got = run_pipeline(data, tmp_path / 'dist2', *again, '--vocabulary', 'distributed')
    for f in FILES:
        assert (tmp_path / 'dist2' / 'model' / f'{f}.npy').read_bytes() == \
            (tmp_path / 'local2' / 'model' / f'{f}.npy').read_bytes(), f
    assert load_metrics(tmp_path / 'dist2')['changes'] == load_metrics(tmp_path / 'local2')['changes']
    assert got['test_rmse'] == local['test_rmse']


def _consumers(proto, pcoll: str) -> set[str]:
    return {t.unique_name for t in proto.components.transforms.values()
            if pcoll in t.inputs.values() and not t.subtransforms}


def test_only_the_writer_holds_every_id(tmp_path, several_ranges):
    data = _ratings(tmp_path, strings=True)
    config = make_config('--input', data, '--output', str(tmp_path / 'o'), '--num_iters', '1',
                         '--block_size', '16', '--vocabulary', 'distributed')
    pipeline = beam.Pipeline(options=PipelineOptions([]))
    build_pipeline(pipeline, config, staging_path(config.output, 'x'))
    proto = pipeline.to_runner_api()
    transforms = {t.unique_name: t for t in proto.components.transforms.values()}
    assert not [n for n in transforms if n.endswith(('/UserIds', '/ItemIds'))]
    for side in ('User', 'Item'):
        (vocab,) = transforms[f'TrainWals/Vocabulary/{side}Vocabulary'].outputs.values()
        users = _consumers(proto, vocab)
        assert users and all(n.startswith('WriteModel/') for n in users), users
    # and at run time: every range holds fewer IDs than its side
    result = pipeline.run()
    result.wait_until_finish()
    metrics = load_metrics(staging_path(config.output, 'x'))
    for side, total in (('user', metrics['users']), ('item', metrics['items'])):
        (dist,) = result.metrics().query(MetricsFilter().with_name(f'{side}_range_ids'))[
            'distributions']
        value = dist.committed or dist.attempted
        assert value.count > 1 and value.sum == total and value.max < total, (side, value)

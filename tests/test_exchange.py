"""The routed factor exchange (pipeline/training/routed.py): the same model, bit for bit, as
the broadcast exchange, while no block solve holds the whole other side."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.training.block_store import RatingBlock
from pipeline.training.routed import routes
from tests.conftest import write_ratings
from tests.test_cli import train_cli
from wals_core import objectives
from wals_core.params import WalsParams
from wals_core.solve import gramian
from wals_core.sparse import csr_from_triples

MODEL = ('user.npy', 'item.npy', 'row.npy', 'col.npy')


def _random_block(rng, rows: int, cols: int, nnz: int):
    pairs = rng.choice(rows * cols, size=nnz, replace=False)
    return csr_from_triples(pairs // cols, pairs % cols, rng.integers(1, 6, nnz).astype(float),
                            rows)


@pytest.mark.parametrize('model', ['wals', 'implicit', 'explicit'])
@pytest.mark.parametrize('side', ['row', 'col'])
def test_a_solver_given_only_the_needed_rows_is_bit_identical(model, side):
    rng = np.random.default_rng(3)
    m = 90
    train = _random_block(rng, 25, m, 200)
    p = WalsParams(model=model, latent_factors=4, regularization=0.3)
    counts = rng.integers(0, 9, size=m if side == 'row' else 25 + 40).astype(np.int64)
    counts[:7] = 0        # columns without training ratings: C_j = 0 (the general path)
    start = 0 if side == 'row' else 40
    other = rng.standard_normal((m, objectives.stored_width(p))).astype(np.float32)
    g = gramian(other)
    full = objectives.make_solver(train, side, p, counts, start, m, 3.5)
    f, o = objectives.solve_inputs(other, p)
    want = full.solve(f, g, other_offsets=o)

    needed = np.unique(train.indices).astype(np.int64)
    assert len(needed) < m
    compact = type(train)(train.indptr, np.searchsorted(needed, train.indices).astype(np.int32),
                          train.values)
    part = objectives.make_solver(compact, side, p, counts, start, m, 3.5, other_index=needed)
    f, o = objectives.solve_inputs(other[needed], p)
    got = part.solve(f, g, other_offsets=o)
    assert np.array_equal(got, want)


def test_routes_deliver_exactly_the_rows_each_block_needs():
    rng = np.random.default_rng(5)
    users, items, size = 70, 50, 16
    pairs = rng.choice(users * items, size=600, replace=False)
    r, c = pairs // items, pairs % items
    v = np.ones(len(r))

    def blocks(rows, cols, n):
        out = []
        for b, start in enumerate(range(0, n, size)):
            keep = (rows >= start) & (rows < start + size)
            train = csr_from_triples(rows[keep] - start, cols[keep], v[keep],
                                     min(size, n - start))
            e = np.zeros(0, np.int32)
            out.append(RatingBlock(b, start, n, train, e, e, np.zeros(0)))
        return out

    row_blocks, col_blocks = blocks(r, c, users), blocks(c, r, items)
    for sources, dests in ((row_blocks, col_blocks), (col_blocks, row_blocks)):
        got = {d.block_id: [] for d in dests}
        for src in sources:
            rt = routes(src, size)
            for dest, rows in zip(rt.dests.tolist(), rt.rows):
                got[dest].append(rows + src.start)
        for d in dests:
            want = routes(d, size).needed
            arrived = np.concatenate(got[d.block_id]) if got[d.block_id] else np.zeros(0)
            assert np.array_equal(arrived, want)


@pytest.fixture(scope='module')
def sparse_ratings(tmp_path_factory):
    """300 users × 400 items, 3000 ratings: a block of 32 refers to fewer than all
    rows of the other side."""
    rng = np.random.default_rng(8)
    pairs = rng.choice(300 * 400, size=3000, replace=False)
    return write_ratings(tmp_path_factory.mktemp('exchange') / 'ratings.tsv',
                         pairs // 400 + 1, pairs % 400 + 1, rng.integers(1, 6, size=3000))


# Converged after iteration 4 of 6 on these ratings: the last two pass through.
TOLERANCE = {'wals': '0.2', 'implicit': '0.01', 'explicit': '0.05'}


def _run(ratings, out, model: str, *args: str) -> dict:
    train_cli('--input', str(ratings), '--output', str(out), '--model', model,
              '--num_iters', '6', '--latent_factors', '4', '--block_size', '32',
              '--tolerance', TOLERANCE[model], *args)
    return json.loads((out / 'metrics.json').read_text())


@pytest.mark.parametrize('model', ['wals', 'implicit', 'explicit'])
def test_routed_and_auto_are_bit_identical_to_broadcast(sparse_ratings, tmp_path, model):
    runs = {
        'broadcast': ('--exchange', 'broadcast'),
        'routed': ('--exchange', 'routed'),
        # auto with a limit between the two sides' sizes: one routed, one broadcast
        'auto': ('--exchange', 'auto', '--max_broadcast_mb', '0.006'),
    }
    if model == 'wals':
        runs['routed_mp'] = ('--exchange', 'routed', '--direct_running_mode',
                             'multi_processing', '--direct_num_workers', '2')
    metrics = {name: _run(sparse_ratings, tmp_path / name, model, *args)
               for name, args in runs.items()}
    base = metrics['broadcast']
    for name in runs:
        for f in MODEL:
            assert ((tmp_path / name / 'model' / f).read_bytes()
                    == (tmp_path / 'broadcast' / 'model' / f).read_bytes()), (name, f)
        m = metrics[name]
        assert [h['objective'] for h in m['history']] == \
            [h['objective'] for h in base['history']], name
        assert [h['solved'] for h in m['history']] == [h['solved'] for h in base['history']]
        assert m.get('test_rmse') == base.get('test_rmse')
    # --tolerance stops early: the pass-through path is part of the comparison
    assert [h['solved'] for h in base['history']] == [True] * 4 + [False] * 2

    ex = {name: metrics[name]['exchange'] for name in runs}
    width = objectives.stored_width(WalsParams(model=model, latent_factors=4))
    for side, other in (('row', base['items']), ('col', base['users'])):
        assert ex['broadcast'][f'{side}_solves']['other_rows_held_max'] == other
        # routed: every block solve held only the rows its ratings refer to
        assert ex['routed'][f'{side}_solves']['other_rows_held_max'] < other
    # auto at 0.006 MiB: items (400 × width × 4 bytes) are above it and routed,
    # users (300 rows) below it are broadcast whole
    limit = 0.006 * (1 << 20)
    assert 400 * width * 4 > limit >= 300 * width * 4
    assert ex['auto']['row_solves']['other_rows_held_max'] < base['items']
    assert ex['auto']['col_solves']['other_rows_held_max'] == base['users']


def test_column_blocks_that_lost_ratings_stop_the_run():
    from pipeline.training.rating_stats import RatingStats
    from pipeline.training.graph import _check_col_counts
    counts = np.array([3, 0, 2], np.int64)
    assert _check_col_counts(counts, RatingStats(5, 15.0, 1.0, 5.0)) is counts
    with pytest.raises(RuntimeError, match='hold 5 training ratings where the row blocks hold 6'):
        _check_col_counts(counts, RatingStats(6, 15.0, 1.0, 5.0))

"""Rating blocks saved once and cached per worker, with the solver plans they grow."""
from __future__ import annotations

import numpy as np

from pipeline.training import block_store
from pipeline.training.block_store import RatingBlock, save_block
from wals_core.solve import RowSolver, gramian
from wals_core.sparse import csr_from_triples


def _block(block_id: int, rng) -> RatingBlock:
    rows = np.repeat(np.arange(50), 8)
    cols = np.concatenate([rng.choice(40, 8, replace=False) for _ in range(50)])
    train = csr_from_triples(rows, cols, rng.uniform(1, 5, len(rows)), 50)
    empty = np.zeros(0, np.int32)
    return RatingBlock(block_id, block_id * 50, 100, train, empty, empty, np.zeros(0))


def test_saved_block_round_trips_and_is_served_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(block_store, '_CACHE', block_store._LruCache(1 << 30))
    block = _block(0, np.random.default_rng(0))
    ref = save_block(block, str(tmp_path))
    assert ref.load() is block                      # cached: the very object
    monkeypatch.setattr(block_store, '_CACHE', block_store._LruCache(1 << 30))
    again = ref.load()                              # a new worker: read from the file
    assert again is not block
    for name in ('indptr', 'indices', 'values'):
        np.testing.assert_array_equal(getattr(again.train, name), getattr(block.train, name))


def test_solver_plans_count_against_the_cache_limit(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    a, b = _block(0, rng), _block(1, rng)
    cache = block_store._LruCache(1 << 30)
    monkeypatch.setattr(block_store, '_CACHE', cache)
    ref_a = save_block(a, str(tmp_path))
    ref_b = save_block(b, str(tmp_path))
    # Room for both files, not for a plan as well.
    small = block_store._LruCache(ref_a.nbytes + ref_b.nbytes + 100)
    monkeypatch.setattr(block_store, '_CACHE', small)
    small.put(ref_a, a)
    small.put(ref_b, b)
    assert ref_a.load() is a and ref_b.load() is b          # both fit; b most recent
    v = np.random.default_rng(2).standard_normal((40, 4)).astype(np.float32)
    a.solvers['row'] = RowSolver(a.train, np.ones(50), np.ones(40), 0.01, 0.1, 4)
    a.solvers['row'].solve(v, gramian(v))
    assert a.cached_nbytes > 100
    ref_a.load()                                            # a most recent now
    small.put(ref_b, b)                                     # already there: no change
    c = _block(2, rng)
    ref_c = save_block(c, str(tmp_path / 'c'))              # (also lands in `small`)
    # Without a's plan, evicting b (least recently used) would make room; with it,
    # a has to go too.
    assert list(small._items) == [ref_c.path]
    assert ref_c.load() is c

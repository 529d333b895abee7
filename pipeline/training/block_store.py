"""Rating blocks written once, then passed between stages by reference.

Every half-step needs all of one side's rating blocks. Passing the blocks
themselves as PCollection elements makes the runner re-encode and copy every
rating in every iteration; instead each block is saved once (as an .npz under
the run's work folder, local or gs://) and the stages pass a small BlockRef. A
worker process keeps the blocks it has loaded in an LRU cache (bounded by
WALS_BLOCK_CACHE_MB, default 4096), so in steady state an iteration moves only
factors, as Spark ALS does with its persisted blocks. A cached block also keeps
what its solves reuse between iterations (wals_core.solve.RowSolver plans), and
the cache counts their memory too.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import threading

import numpy as np
from apache_beam.io.filesystems import FileSystems

from wals_core.sparse import Csr


@dataclasses.dataclass
class RatingBlock:
    """Rows [start, start + train.num_rows) of one side (users or items).

    train: training ratings, CSR over the block's rows; indices are global
    indices of the other side. test_*: test ratings (row blocks only), rows local.
    """
    block_id: int
    start: int
    total_rows: int            # rows of this side in all blocks
    train: Csr
    test_rows: np.ndarray
    test_cols: np.ndarray
    test_values: np.ndarray
    merged: int = 0            # duplicate (user, item) entries merged into one
    built_at: float = 0.0
    # Per-worker state the solves keep with the block (RowSolver by side and
    # parameters); never saved.
    solvers: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                      compare=False)

    @property
    def cached_nbytes(self) -> int:
        """Memory of the solver plans kept with the block."""
        return sum(s.plan_nbytes for s in list(self.solvers.values()))

    @property
    def num_rows(self) -> int:
        return self.train.num_rows


@dataclasses.dataclass(frozen=True)
class BlockRef:
    """Where a saved RatingBlock lives, with the facts needed without loading it."""
    path: str
    block_id: int
    start: int
    num_rows: int
    total_rows: int
    nbytes: int
    merged: int
    built_at: float

    def load(self) -> RatingBlock:
        return _CACHE.get(self)


def save_arrays(path: str, **arrays: np.ndarray) -> int:
    """Writes named arrays to one .npz (local or gs://; no pickles); returns the
    arrays' bytes. Written straight into the file, without first building the whole
    file in memory (two more copies of a block, for a moment)."""
    with FileSystems.create(path) as f:
        np.savez(f, **arrays)    # zipfile writes to a stream that cannot seek, too
    return sum(int(a.nbytes) for a in arrays.values())


def load_arrays(path: str) -> dict[str, np.ndarray]:
    """The arrays save_arrays wrote, by name."""
    with FileSystems.open(path) as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        return {name: data[name] for name in data.files}


def save_block(block: RatingBlock, folder: str) -> BlockRef:
    """Writes the block (np.savez, no pickles) and keeps it in this process's cache."""
    path = f'{folder.rstrip("/")}/block-{block.block_id:06d}.npz'
    nbytes = save_arrays(path, indptr=block.train.indptr, indices=block.train.indices,
                         values=block.train.values, test_rows=block.test_rows,
                         test_cols=block.test_cols, test_values=block.test_values)
    ref = BlockRef(path, block.block_id, block.start, block.num_rows, block.total_rows,
                   nbytes, block.merged, block.built_at)
    _CACHE.put(ref, block)
    return ref


def _read_block(ref: BlockRef) -> RatingBlock:
    arrays = load_arrays(ref.path)
    return RatingBlock(ref.block_id, ref.start, ref.total_rows,
                       Csr(arrays['indptr'], arrays['indices'], arrays['values']),
                       arrays['test_rows'], arrays['test_cols'], arrays['test_values'],
                       ref.merged, ref.built_at)


class _LruCache:
    """Blocks by path, least recently used evicted first. An entry's size is its file
    size plus the solver plans it has grown, re-measured whenever a block is added."""

    def __init__(self, limit_bytes: int):
        self._limit = limit_bytes
        self._items: collections.OrderedDict[str, tuple[int, RatingBlock]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, ref: BlockRef, block: RatingBlock) -> None:
        with self._lock:
            if ref.path in self._items:
                return
            self._items[ref.path] = (ref.nbytes, block)
            total = sum(size + b.cached_nbytes for size, b in self._items.values())
            while total > self._limit and len(self._items) > 1:
                _, (size, old) = self._items.popitem(last=False)
                total -= size + old.cached_nbytes

    def get(self, ref: BlockRef) -> RatingBlock:
        with self._lock:
            hit = self._items.get(ref.path)
            if hit is not None:
                self._items.move_to_end(ref.path)
                return hit[1]
        block = _read_block(ref)
        self.put(ref, block)
        return block


_CACHE = _LruCache(int(os.environ.get('WALS_BLOCK_CACHE_MB', '4096')) << 20)

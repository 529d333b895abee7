"""Grouping ratings once into row blocks (users) and column blocks (items).

After this step the pipeline never moves ratings again: each iteration moves
factors to the blocks. A row block also holds its users' test ratings.
"""
from __future__ import annotations

import dataclasses
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton

from pipeline.training.block_store import BlockRef, RatingBlock, save_block
from pipeline.io.parse import ParsedChunk
from wals_core.hashing import is_test
from wals_core.sparse import (csr_from_sorted, csr_from_triples, merge_duplicates,
                              pair_keys)
from wals_core.vocab import Vocabulary


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    block_size: int
    test_fraction: float
    split_seed: int
    duplicates: str            # 'mean' (ratings) or 'sum' (web_views)
    holdout: bool = False      # test pairs come from --test_input, not the hashed split


_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64),
          np.zeros(0, bool))


def num_blocks(rows: int, block_size: int) -> int:
    return -(-rows // block_size)


def _key_by_block(rows, cols, values, flags, block_size):
    """(block id, (rows, cols, values, flags)) for each block the rows touch.

    Pieces come sorted by (row, col), so the block builder's sort of several
    pieces only merges sorted runs.
    """
    order = np.argsort(pair_keys(rows, cols), kind='stable')
    bid = rows[order] // block_size
    cuts = np.flatnonzero(np.diff(bid)) + 1
    for first, part in zip(np.r_[0, cuts], np.split(order, cuts)):
        if len(part):
            # int32 indices: a third fewer bytes through the shuffle
            yield int(bid[first]), (rows[part].astype(np.int32), cols[part].astype(np.int32),
                                    values[part], flags[part])


class IndexChunk(beam.DoFn):
    """ParsedChunk -> (row block id, (user idx, item idx, value, is_test)).

    Training chunks are split by the stable pair hash, or are all training when the
    test pairs come from a held-out file (config.holdout). Chunks of that file
    (test=True) are all test; their pairs whose user or item is not in the training
    vocabulary are cold start: counted on the COLD output, not placed in a block."""
    COLD = 'cold_start'

    def __init__(self, config: BlockConfig, test: bool = False):
        self._config = config
        self._test = test

    def process(self, chunk: ParsedChunk, users: Vocabulary, items: Vocabulary):
        if not len(chunk.values):
            return
        if self._test:
            rows, cols = users.lookup_known(chunk.user_ids), items.lookup_known(chunk.item_ids)
            yield from index_ratings(self._config, True, rows, None, cols, None,
                                     chunk.user_codes, chunk.item_codes, chunk.values)
        else:
            rows, cols = users.lookup(chunk.user_ids), items.lookup(chunk.item_ids)
            yield from index_ratings(self._config, False, rows, users.hashes[rows], cols,
                                     items.hashes[cols], chunk.user_codes, chunk.item_codes,
                                     chunk.values)


def index_ratings(cfg: BlockConfig, test: bool, user_index: np.ndarray,
                  user_hash: np.ndarray | None, item_index: np.ndarray,
                  item_hash: np.ndarray | None, user_codes: np.ndarray,
                  item_codes: np.ndarray, values: np.ndarray):
    """One chunk's ratings -> (row block id, piece), as IndexChunk yields them, from
    the dense index (-1: unknown, test chunks only) and the stable hash of each of
    the chunk's distinct IDs, and a code per rating into them."""
    rows, cols = user_index[user_codes], item_index[item_codes]
    if test:
        known = (rows >= 0) & (cols >= 0)
        if not np.all(known):
            yield beam.pvalue.TaggedOutput(IndexChunk.COLD, int((~known).sum()))
            rows, cols, values = rows[known], cols[known], values[known]
        flags = np.ones(len(rows), bool)
    elif cfg.holdout:
        flags = np.zeros(len(rows), bool)
    else:
        flags = is_test(user_hash[user_codes], item_hash[item_codes], cfg.split_seed,
                        cfg.test_fraction)
    yield from _key_by_block(rows, cols, values, flags, cfg.block_size)


def _all_block_keys(_, vocab, block_size: int):
    """An empty piece for every block id, so every block exists even with no ratings."""
    for b in range(num_blocks(len(vocab), block_size)):
        yield b, _EMPTY


def _concat(pieces):
    pieces = list(pieces)
    return tuple(np.concatenate([p[f] for p in pieces]) for f in range(4))


def _merge_each(rows, cols, values, test, how: str):
    """merge_duplicates of the training and the test triples separately, each sorted
    by (row, col); returns them concatenated (training first) with the flags."""
    parts = [merge_duplicates(rows[m], cols[m], values[m], how) for m in (~test, test)]
    out = [np.concatenate([p[f] for p in parts]) for f in range(3)]
    flags = np.repeat([False, True], [len(parts[0][0]), len(parts[1][0])])
    return (*out, flags, parts[0][4] + parts[1][4])


class _BuildRowBlock(beam.DoFn):
    def __init__(self, config: BlockConfig, folder: str):
        self._config = config
        self._folder = folder
        self._merged = Metrics.counter('wals', 'duplicates_merged')

    def process(self, keyed, users: Vocabulary):
        block_id, pieces = keyed
        cfg = self._config
        rows, cols, values, test = _concat(pieces)
        if cfg.holdout:
            # A pair may be in both files: merge duplicates within each side only.
            rows, cols, values, test, merged = _merge_each(rows, cols, values, test,
                                                           cfg.duplicates)
        else:   # the split is a function of the pair: duplicates share their flag
            rows, cols, values, test, merged = merge_duplicates(rows, cols, values,
                                                                cfg.duplicates, test)
        self._merged.inc(merged)
        start = block_id * cfg.block_size
        n = min(cfg.block_size, len(users) - start)
        train = ~test
        yield save_block(RatingBlock(
            block_id=block_id, start=start, total_rows=len(users),
            train=csr_from_sorted(rows[train] - start, cols[train], values[train], n),
            test_rows=(rows[test] - start).astype(np.int32),
            test_cols=cols[test].astype(np.int32), test_values=values[test],
            merged=merged, built_at=time.time()), self._folder)


def _training_by_col_block(ref: BlockRef, block_size: int):
    """A row block's training ratings, keyed by column block, as (col, row, value)."""
    block = ref.load()
    t = block.train
    rows = t.row_of_entry() + block.start
    cols = t.indices.astype(np.int64)
    yield from _key_by_block(cols, rows, t.values, np.zeros(len(cols), bool), block_size)


class _BuildColBlock(beam.DoFn):
    def __init__(self, config: BlockConfig, folder: str):
        self._config = config
        self._folder = folder

    def process(self, keyed, items: Vocabulary):
        block_id, pieces = keyed
        cols, rows, values, _ = _concat(pieces)
        start = block_id * self._config.block_size
        n = min(self._config.block_size, len(items) - start)
        empty = np.zeros(0, np.int32)
        yield save_block(RatingBlock(
            block_id=block_id, start=start, total_rows=len(items),
            train=csr_from_triples(cols - start, rows, values, n),
            test_rows=empty, test_cols=empty, test_values=np.zeros(0),
            built_at=time.time()), self._folder)


class BuildBlocks(beam.PTransform):
    """PCollection[ParsedChunk] -> (row blocks, column blocks), PCollections of
    BlockRef to RatingBlocks saved under `folder`. Needs the user and item
    vocabularies (singleton PCollections; only their len() with `indexed`).
    `indexed`: (pieces, test pieces or None, cold-start counts or None) already
    keyed by row block, as IndexChunk yields them (the distributed vocabulary):
    they replace the Index steps, and the input chunks are not read."""

    def __init__(self, config: BlockConfig, users, items, folder: str, test_chunks=None,
                 indexed=None):
        super().__init__()
        self._indexed = indexed
        self._config = config
        self._folder = folder.rstrip('/')
        self._users = users
        self._items = items
        self._test_chunks = test_chunks
        self.cold_start = None   # after expand with test_chunks: counts of cold pairs

    def expand(self, chunks):
        cfg = self._config
        users, items = AsSingleton(self._users), AsSingleton(self._items)
        seed = chunks.pipeline | 'Seed' >> beam.Create([None])
        row_keys = seed | 'RowKeys' >> beam.FlatMap(_all_block_keys, users, cfg.block_size)
        if self._indexed is not None:
            keyed, test_pieces, self.cold_start = self._indexed
            pieces = [keyed, row_keys] + ([test_pieces] if test_pieces is not None else [])
        else:
            keyed = chunks | 'Index' >> beam.ParDo(IndexChunk(cfg), users, items)
            pieces = [keyed, row_keys]
        if self._test_chunks is not None and self._indexed is None:
            test = self._test_chunks | 'IndexTest' >> beam.ParDo(
                IndexChunk(cfg, test=True), users, items).with_outputs(
                    IndexChunk.COLD, main='pieces')
            pieces.append(test.pieces)
            self.cold_start = test[IndexChunk.COLD]
        row_blocks = (tuple(pieces) | 'AllRowPieces' >> beam.Flatten()
                      | 'GroupRows' >> beam.GroupByKey()
                      | 'RowBlock' >> beam.ParDo(_BuildRowBlock(cfg, f'{self._folder}/rows'), users))
        col_keys = seed | 'ColKeys' >> beam.FlatMap(_all_block_keys, items, cfg.block_size)
        col_pieces = row_blocks | 'ByColBlock' >> beam.FlatMap(_training_by_col_block,
                                                                cfg.block_size)
        col_blocks = ((col_pieces, col_keys) | 'AllColPieces' >> beam.Flatten()
                      | 'GroupCols' >> beam.GroupByKey()
                      | 'ColBlock' >> beam.ParDo(_BuildColBlock(cfg, f'{self._folder}/cols'), items))
        return row_blocks, col_blocks

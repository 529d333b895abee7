"""seen_items (model/seen/part-*.npz): each user's training and test items, sorted,
whatever order the block's training CSR and test pairs come in."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.training.block_store import RatingBlock
from pipeline.training.write_model import seen_items
from wals_core.sparse import Csr


def reference(rows: np.ndarray, cols: np.ndarray, num_rows: int):
    order = np.lexsort((cols, rows))
    indptr = np.zeros(num_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=num_rows), out=indptr[1:])
    return indptr, cols[order]


def make_block(rng, num_rows: int, n_train: int, n_test: int, n_items: int,
               shuffle_rows: bool) -> RatingBlock:
    keys = rng.choice(num_rows * n_items, n_train + n_test, replace=False)
    train, test = np.sort(keys[:n_train]), keys[n_train:]
    rows, cols = train // n_items, train % n_items
    indptr = np.zeros(num_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=num_rows), out=indptr[1:])
    cols = cols.astype(np.int32)
    if shuffle_rows:   # items within each row out of order
        for r in range(num_rows):
            rng.shuffle(cols[indptr[r]:indptr[r + 1]])
    return RatingBlock(block_id=0, start=0, total_rows=num_rows,
                       train=Csr(indptr, cols, np.ones(n_train)),
                       test_rows=(test // n_items).astype(np.int32),
                       test_cols=(test % n_items).astype(np.int32),
                       test_values=np.ones(n_test))


@pytest.mark.parametrize('shuffle_rows', [False, True])
@pytest.mark.parametrize('n_test', [0, 1, 57, 400])
def test_seen_items_are_each_users_train_and_test_items_sorted(shuffle_rows, n_test):
    rng = np.random.default_rng(n_test + 10 * shuffle_rows)
    block = make_block(rng, num_rows=40, n_train=600, n_test=n_test, n_items=50,
                       shuffle_rows=shuffle_rows)
    indptr, indices = seen_items(block)
    t = block.train
    rows = np.concatenate([t.row_of_entry(), block.test_rows.astype(np.int64)])
    cols = np.concatenate([t.indices, block.test_cols]).astype(np.int64)
    want_ptr, want_idx = reference(rows, cols, block.num_rows)
    if n_test or not shuffle_rows:   # no test pairs: the CSR is passed through as is
        np.testing.assert_array_equal(indptr, want_ptr)
        np.testing.assert_array_equal(indices, want_idx)
        assert indices.dtype == np.int32
    # Without the test pairs, only the training CSR as it is.
    indptr, indices = seen_items(block, include_test=False)
    np.testing.assert_array_equal(indptr, t.indptr)
    np.testing.assert_array_equal(indices, t.indices)

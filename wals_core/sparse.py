"""CSR-style blocks of ratings: build them from (row, col, value) triples."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Csr:
    """Rows [0, n) of a sparse matrix: row r's entries are indices/values[indptr[r]:indptr[r+1]].

    indices are column numbers of the other side (int32, sorted within a row);
    values are float64.
    """
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return len(self.indices)

    def row_of_entry(self) -> np.ndarray:
        """The row number of every stored entry (int64)."""
        return np.repeat(np.arange(self.num_rows, dtype=np.int64), np.diff(self.indptr))


def merge_duplicates(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, how: str,
                     tag: np.ndarray | None = None,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Sorts triples by (row, col) and merges repeated pairs by 'mean' or 'sum'.

    Where pairs repeat, they are also sorted by value, so merged means are
    bit-identical however the triples arrived. `tag` (one value per triple, equal
    within a pair) is carried along.
    Returns (rows, cols, values, tag, number of entries merged away).
    """
    if how not in ('mean', 'sum'):
        raise ValueError(f"how must be 'mean' or 'sum', got {how!r}")
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    key = pair_keys(rows, cols)
    order = np.argsort(key, kind='stable')
    repeat = np.diff(key[order]) == 0
    if repeat.any():     # rare: pay for the value-ordered sort only then
        order = np.lexsort((values, cols, rows))
        repeat = np.diff(pair_keys(rows[order], cols[order])) == 0
    rows, cols, values = rows[order], cols[order], values[order]
    tag = None if tag is None else np.asarray(tag)[order]
    merged = int(repeat.sum())
    if merged == 0:
        return rows, cols, values, tag, 0
    starts = np.flatnonzero(np.concatenate(([True], ~repeat)))
    sums = np.add.reduceat(values, starts)
    if how == 'mean':
        sums = sums / np.diff(np.append(starts, len(rows)))
    return rows[starts], cols[starts], sums, None if tag is None else tag[starts], merged


def sorted_unique(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a 1-d numeric array; sorts `keys` in place.
    Sort-based: several times faster than np.unique (numpy 2.x hashes) on int64."""
    keys.sort()
    if keys.size < 2:
        return keys
    first = np.empty(keys.size, dtype=bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    return keys[first]


def pair_keys(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """One int64 per (row, col) that sorts like (row, col) for non-negative indices
    below 2**31 each."""
    return (np.asarray(rows, np.int64) << np.int64(31)) | np.asarray(cols, np.int64)


def csr_from_sorted(rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
                    num_rows: int) -> Csr:
    """CSR of triples already sorted by (row, col), rows in [0, num_rows)."""
    counts = np.bincount(rows, minlength=num_rows) if len(rows) else np.zeros(num_rows, np.int64)
    indptr = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return Csr(indptr, np.asarray(cols, dtype=np.int32), np.asarray(values, dtype=np.float64))


def csr_from_triples(rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
                     num_rows: int) -> Csr:
    """CSR of unsorted, duplicate-free triples."""
    order = np.argsort(pair_keys(rows, cols), kind='stable')
    return csr_from_sorted(np.asarray(rows, np.int64)[order], np.asarray(cols)[order],
                           np.asarray(values)[order], num_rows)


def select_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of the given rows of a CSR pattern, in the given order."""
    indptr = np.asarray(indptr, np.int64)
    rows = np.asarray(rows, np.int64)
    lengths = indptr[rows + 1] - indptr[rows]
    out_ptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=out_ptr[1:])
    if len(rows) > 1 and rows[0] >= 0 and np.all(rows[1:] > rows[:-1]):
        # Increasing rows (np.flatnonzero's): the entries keep their order, so a mask
        # over them does it with a byte per entry instead of two int64 index arrays.
        keep = np.zeros(len(indptr) - 1, bool)
        keep[rows] = True
        used = np.asarray(indices)[indptr[0]:indptr[-1]]
        return out_ptr, used[np.repeat(keep, np.diff(indptr))]
    pos = np.repeat(indptr[rows] - out_ptr[:-1], lengths) + np.arange(out_ptr[-1])
    return out_ptr, np.asarray(indices)[pos]


def check_csr(indptr: np.ndarray, indices: np.ndarray, num_rows: int, name: str,
              num_cols: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) as int64 after checking they describe `num_rows` rows:
    num_rows + 1 non-decreasing pointers within indices, and the indices the rows
    use in [0, num_cols) (only >= 0 when num_cols is None). `name` prefixes the
    argument names in the errors (e.g. 'exclude' for exclude_indptr)."""
    indptr = np.asarray(indptr, dtype=np.int64).reshape(-1)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indptr.shape[0] != num_rows + 1:
        raise ValueError(f'{name}_indptr has {indptr.shape[0]} entries for {num_rows} rows')
    if num_rows and (indptr[0] < 0 or indptr[-1] > len(indices) or np.any(np.diff(indptr) < 0)):
        raise ValueError(f'{name}_indptr must be non-decreasing within {name}_indices')
    used = indices[indptr[0]:indptr[-1]] if num_rows else indices[:0]
    if len(used) and used.min() < 0:
        raise ValueError(f'{name}_indices must be >= 0')
    if len(used) and num_cols is not None and used.max() >= num_cols:
        raise ValueError(f'{name}_indices must be in [0, {num_cols})')
    return indptr, indices

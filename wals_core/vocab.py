"""Vocabularies: the sorted unique IDs of one side, and ID -> dense index lookups.

IDs stay the strings found in the file. When every ID is a canonical decimal
integer that fits int64 ("42", not "042" or "+42"), the vocabulary is an int64
array sorted numerically; otherwise a str array sorted by code point.
"""
from __future__ import annotations

import re

import numpy as np

from wals_core.hashing import id_hashes

_CANONICAL_INT = re.compile(r'0|-?[1-9][0-9]{0,18}')
_INT64_MAX = np.iinfo(np.int64).max


def _is_int64(text: str) -> bool:
    return bool(_CANONICAL_INT.fullmatch(text)) and abs(int(text)) <= _INT64_MAX


def finalize_ids(unique_ids: np.ndarray) -> np.ndarray:
    """Sorted vocabulary (int64 or str array) from unique ID strings."""
    ids = np.unique(np.asarray(unique_ids, dtype=str))
    if len(ids) and all(_is_int64(s) for s in ids.tolist()):
        return np.sort(ids.astype(np.int64))
    return ids


def canonical_int64(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bool per ID: a canonical int64 as finalize_ids means it, int64 value or 0),
    vectorized; strings numpy cannot parse take the per-ID test."""
    ids = np.asarray(ids, dtype=str)
    if not len(ids):
        return np.zeros(0, bool), np.zeros(0, np.int64)
    try:
        values = ids.astype(np.int64)
    except (ValueError, OverflowError):
        ok = np.array([_is_int64(s) for s in ids.tolist()], dtype=bool)
        values = np.zeros(len(ids), np.int64)
        values[ok] = ids[ok].astype(np.int64)
        return ok, values
    # A parsed value is canonical when it prints back as the same text ("042",
    # "+4", " 5", "1_000" do not); -2**63 is outside finalize_ids' |x| <= 2**63 - 1.
    ok = (values.astype(str) == ids) & (values != np.iinfo(np.int64).min)
    return ok, np.where(ok, values, 0)


def lookup(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Dense int64 index in `vocab` of every ID string in `ids` (all must be present)."""
    ids = np.asarray(ids, dtype=str)
    keys = ids.astype(np.int64) if vocab.dtype.kind == 'i' else ids
    index = np.searchsorted(vocab, keys)
    if len(ids) and (index.max(initial=0) >= len(vocab) or np.any(vocab[np.minimum(index, len(vocab) - 1)] != keys)):
        raise KeyError('some IDs are not in the vocabulary')
    return index.astype(np.int64)


def lookup_known(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Like lookup, but an ID that is not in `vocab` gets -1 instead of an error."""
    ids = np.asarray(ids, dtype=str)
    out = np.full(len(ids), -1, np.int64)
    if not len(ids) or not len(vocab):
        return out
    if vocab.dtype.kind == 'i':
        ok = np.array([_is_int64(s) for s in ids.tolist()], dtype=bool)
        keys = np.zeros(len(ids), np.int64)
        keys[ok] = ids[ok].astype(np.int64)
    else:
        ok = np.ones(len(ids), bool)
        keys = ids
    index = np.minimum(np.searchsorted(vocab, keys), len(vocab) - 1)
    found = ok & (vocab[index] == keys)
    out[found] = index[found]
    return out


class Vocabulary:
    """The sorted IDs of one side with their stable hashes (for splits and init)."""

    def __init__(self, ids: np.ndarray, hashes: np.ndarray | None = None):
        self.ids = ids
        # hashes: id_hashes(ids), when already known (the distributed vocabulary)
        self.hashes = id_hashes(ids.tolist()) if hashes is None else hashes

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        return lookup(self.ids, ids)

    def lookup_known(self, ids: np.ndarray) -> np.ndarray:
        """Indices of `ids`, -1 for IDs not in the vocabulary."""
        return lookup_known(self.ids, ids)

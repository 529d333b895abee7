"""Stable, salt-free hashing: the same ID gives the same bits on every runner.

Python's built-in hash() is salted per process, so it must never decide a split or
an initial value. IDs are hashed once with BLAKE2b; everything per rating is then a
vectorized SplitMix64 mix of those 64-bit hashes.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray | int) -> np.ndarray:
    """SplitMix64 finalizer, element-wise on uint64 (wraps modulo 2**64)."""
    with np.errstate(over='ignore'):   # the wrap-around is the point
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def id_hashes(ids: Iterable) -> np.ndarray:
    """64-bit BLAKE2b hash of each ID's text (int IDs hash as their decimal text)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(i).encode('utf-8'), digest_size=8).digest(),
                        'little') for i in ids),
        dtype=np.uint64)


def to_unit(bits: np.ndarray) -> np.ndarray:
    """uint64 -> float64 uniform in [0, 1) using the top 53 bits."""
    return (np.asarray(bits, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def pair_unit(user_hash: np.ndarray, item_hash: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per (user, item, seed), from the IDs' hashes."""
    salt = mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    return to_unit(mix64(mix64(user_hash ^ salt) ^ item_hash))


def is_test(user_hash: np.ndarray, item_hash: np.ndarray, split_seed: int,
            test_fraction: float) -> np.ndarray:
    """True where the (user, item) pair belongs to the test split."""
    return pair_unit(user_hash, item_hash, split_seed) < test_fraction

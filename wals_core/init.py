"""Initial factors: standard normal (as TF's "random" init), reproducible per ID.

The vector of an ID depends only on (seed, side, the ID's hash), never on its index,
the sharding or the runner: counter-based SplitMix64 bits through Box-Muller.
"""
from __future__ import annotations

import numpy as np

from wals_core.hashing import mix64, to_unit

_SIDE_SALT = {'row': 0x524F57, 'col': 0x434F4C}


def initial_factors(id_hash: np.ndarray, latent_factors: int, seed: int,
                    side: str) -> np.ndarray:
    """(len(id_hash), latent_factors) float32 N(0, 1) values for the given IDs."""
    k = int(latent_factors)
    salt = mix64(np.uint64((seed * 1_000_003 + _SIDE_SALT[side]) & 0xFFFFFFFFFFFFFFFF))
    base = mix64(np.asarray(id_hash, dtype=np.uint64) ^ salt)
    with np.errstate(over='ignore'):
        counters = base[:, None] + np.arange(2 * k, dtype=np.uint64)[None, :]
    bits = mix64(counters)
    u1 = 1.0 - to_unit(bits[:, :k])   # (0, 1]: log is finite
    u2 = to_unit(bits[:, k:])
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)

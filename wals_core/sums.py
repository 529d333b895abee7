"""Floating sums with a fixed order: the same bits for any BLAS thread count.

Every number the tool reports or compares (RMSEs, the objective history, the
ranking metrics) is a sum of many float64 terms. A BLAS dot product (`a @ b`,
np.dot on vectors) sums in an order of its own that depends on its thread count
(OpenBLAS splits a long vector between threads and adds their partial sums), so
its last bits change with OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS,
with a process-wide thread limit that another thread changes meanwhile, and with
the worker's core count. The sums here never call BLAS:

* the terms are cut into consecutive chunks of CHUNK (4096) elements, counted from
  the first term;
* each chunk is summed by np.add.reduce (numpy's pairwise summation: an order fixed
  by the chunk's length alone, no threads);
* the chunk sums are added by math.fsum: exactly, then rounded once, so their order
  does not matter.

The result is a function of the terms alone. It does not change when a caller
feeds the terms in pieces whose lengths are multiples of CHUNK (FixedSum), which is
how the slice-by-slice evaluations keep their memory bounded.
"""
from __future__ import annotations

import math

import numpy as np

# Terms per pairwise partial sum: 32 KiB of float64 (L1 cache). numpy's reduction
# buffer (8192 elements by default) holds a whole chunk, so the pairwise order is
# that of the chunk length alone.
CHUNK = 4096
# Products formed at a time by FixedSum.add_products (2 MiB of float64 scratch).
_SPAN = 64 * CHUNK


def _chunk_sums(x: np.ndarray) -> list[float]:
    """Pairwise sums of x's consecutive CHUNK-element chunks (the last may be short)."""
    n = x.shape[0]
    full = n - n % CHUNK
    parts = np.add.reduce(x[:full].reshape(-1, CHUNK), axis=1).tolist() if full else []
    if full < n:
        parts.append(float(np.add.reduce(x[full:])))
    return parts


class FixedSum:
    """A float64 sum fed piece by piece, in a fixed order (see the module docstring).

    Pieces whose lengths are multiples of CHUNK (but the last) give the same value as
    one call with everything."""

    def __init__(self) -> None:
        self._parts: list[float] = []

    def add(self, terms: np.ndarray) -> 'FixedSum':
        """Adds the terms (cast to float64, flattened in C order)."""
        x = np.ascontiguousarray(terms, dtype=np.float64).reshape(-1)
        self._parts.extend(_chunk_sums(x))
        return self

    def add_products(self, a: np.ndarray, b: np.ndarray) -> 'FixedSum':
        """Adds Σ a_i·b_i (float64 products), without a BLAS call."""
        a = np.asarray(a, dtype=np.float64).reshape(-1)
        b = np.asarray(b, dtype=np.float64).reshape(-1)
        if a.shape != b.shape:
            raise ValueError(f'cannot multiply {a.shape[0]} terms by {b.shape[0]}')
        n = a.shape[0]
        if n <= _SPAN:
            self._parts.extend(_chunk_sums(np.multiply(a, b)))
            return self
        buf = np.empty(_SPAN)
        for lo in range(0, n, _SPAN):      # _SPAN is a multiple of CHUNK
            m = min(_SPAN, n - lo)
            np.multiply(a[lo:lo + m], b[lo:lo + m], out=buf[:m])
            self._parts.extend(_chunk_sums(buf[:m]))
        return self

    def add_sum(self, other: 'FixedSum') -> 'FixedSum':
        """Adds another FixedSum's terms: as if they had been fed here (its pieces
        keep their chunks; the chunk sums' order does not matter to math.fsum)."""
        self._parts.extend(other._parts)
        return self

    @property
    def value(self) -> float:
        return math.fsum(self._parts)


def fixed_sum(terms: np.ndarray) -> float:
    """Σ terms in float64, in a fixed order (no BLAS; the same for any thread count)."""
    return FixedSum().add(terms).value


def fixed_dot(a: np.ndarray, b: np.ndarray) -> float:
    """Σ a_i·b_i of two vectors in float64, in a fixed order: what `a @ b` computes,
    without BLAS's thread-dependent summation order."""
    return FixedSum().add_products(a, b).value


def sum_of_squares(x: np.ndarray) -> float:
    """Σ x_i² in float64, in a fixed order (e.g. a squared error from its residuals)."""
    return fixed_dot(x, x)

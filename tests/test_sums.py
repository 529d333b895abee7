"""wals_core/sums.py: fixed-order float sums (docs/determinism.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from wals_core.sums import CHUNK, FixedSum, fixed_dot, fixed_sum, sum_of_squares


@pytest.mark.parametrize('n', [0, 1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17,
                               (1 << 18) + 5, (1 << 19) + 3])
def test_close_to_the_exact_sum(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=n), rng.normal(size=n)
    exact = math.fsum((a * b).tolist())        # products are exact to one rounding
    assert fixed_dot(a, b) == pytest.approx(exact, rel=1e-12, abs=1e-12)
    assert fixed_sum(a) == pytest.approx(math.fsum(a.tolist()), rel=1e-12, abs=1e-12)
    assert sum_of_squares(a) == fixed_dot(a, a)


def test_the_value_is_a_function_of_the_terms_alone():
    """Pieces of whole chunks give the value of one call; the result does not depend
    on the memory the terms sit in (a copy at another alignment, float32 input)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=10 * CHUNK + 123)
    whole = fixed_sum(x)
    pieces = FixedSum()
    for lo, hi in ((0, CHUNK), (CHUNK, 4 * CHUNK), (4 * CHUNK, len(x))):
        pieces.add(x[lo:hi])
    assert pieces.value == whole
    shifted = np.empty(len(x) + 1)[1:]
    shifted[:] = x
    assert fixed_sum(shifted) == whole
    y = rng.normal(size=len(x))
    big = FixedSum().add_products(x, y).value        # above the scratch span: in spans
    assert big == fixed_sum(x * y)
    f32 = x.astype(np.float32)
    assert fixed_sum(f32) == fixed_sum(f32.astype(np.float64))


def test_no_blas_thread_count_changes_it():
    """In this process, under 1 and 2 BLAS threads (tests/test_thread_independence.py
    does it in separate processes, for the whole tool)."""
    from threadpoolctl import threadpool_limits
    x = np.random.default_rng(2).normal(size=200_000)
    with threadpool_limits(1, 'blas'):
        one = fixed_dot(x, x[::-1].copy())
    with threadpool_limits(2, 'blas'):
        two = fixed_dot(x, x[::-1].copy())
    assert one == two


def test_shapes_must_agree():
    with pytest.raises(ValueError, match='cannot multiply'):
        fixed_dot(np.ones(3), np.ones(4))

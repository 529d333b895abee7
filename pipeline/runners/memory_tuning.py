"""Allocator settings for a process that moves big numpy arrays (glibc only).

Why: glibc serves every allocation above its mmap threshold (adaptive, at most
32 MiB) with a fresh mmap and unmaps it on free, so each stage's big arrays (a
block of millions of ratings, its sort keys, its gathered factors) start on new
pages the kernel must zero-fill again. Measured at 10M ratings, DirectRunner
in_memory, 10 iterations: 11.5 s of system time and 30.8 s wall without this,
4.4 s and 24.5 s with it (block building 17.4 s -> 9.8 s). Raising the mmap and
trim thresholds to 1 GiB keeps freed memory in the process for the next array.
Cost: a higher peak RSS (same run: 2.1 -> 2.5 GB).

One arena for every thread: Beam runs each bundle on a worker thread, and glibc
gives threads their own arenas, whose heaps hold at most 64 MiB: a bigger array
made on a thread (a range's parsed ratings, a block, its encoded bytes) was
mmapped and zero-filled afresh whatever the thresholds. Measured at 10M ratings,
in_memory, 4 iterations, three alternating runs without and with
GLIBC_TUNABLES=glibc.malloc.arena_max=1: system time 13.4/10.8/8.4 s ->
9.0/6.8/5.3 s, peak RSS 1.74-1.83 -> 1.53 GB (with the other read changes of its
commit: bench/results/read_group.md).

The command line calls tune_malloc() once at start; WALS_TUNE_MALLOC=0 turns it
off. Child processes (the DirectRunner's multi_processing workers) get the same
settings through GLIBC_TUNABLES, unless it is already set.
"""
from __future__ import annotations

import ctypes
import os
import sys

THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD = -1     # glibc's <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
TUNABLES = (f'glibc.malloc.mmap_threshold={THRESHOLD}:'
            f'glibc.malloc.trim_threshold={THRESHOLD}:glibc.malloc.arena_max=1')


def tune_malloc() -> bool:
    """Applies the thresholds to this process (and its future children); returns
    whether this process's allocator took them (False off glibc or when disabled)."""
    if os.environ.get('WALS_TUNE_MALLOC', '1') == '0' or not sys.platform.startswith('linux'):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):      # not glibc (e.g. musl): leave it alone
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # Before the runner starts threads: an arena a thread already has stays its own.
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, THRESHOLD), (_M_TRIM_THRESHOLD, THRESHOLD), (_M_ARENA_MAX, 1)))
    if ok:
        os.environ.setdefault('GLIBC_TUNABLES', TUNABLES)
    return ok

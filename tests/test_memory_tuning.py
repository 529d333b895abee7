"""The allocator thresholds the command line sets (pipeline/runners/memory_tuning.py),
checked in fresh processes through glibc's own accounting (mallinfo2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = """
import ctypes, json, os, sys, threading
import numpy as np
from pipeline.runners.memory_tuning import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks',
        'uordblks', 'fordblks', 'keepcost')]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
tuned = tune_malloc()
before = libc.mallinfo2().hblkhd
big = np.ones(100 << 20, np.uint8)          # 100 MiB
mapped = libc.mallinfo2().hblkhd - before   # bytes in separately mmapped chunks
del big
on_thread = {}
def alloc():   # as a Beam bundle does, on a worker thread
    start = libc.mallinfo2().hblkhd
    arr = np.ones(100 << 20, np.uint8)
    on_thread['mapped'] = libc.mallinfo2().hblkhd - start
t = threading.Thread(target=alloc)
t.start(); t.join()
print(json.dumps({'tuned': tuned, 'mapped': mapped, 'thread_mapped': on_thread['mapped'],
                  'tunables': os.environ.get('GLIBC_TUNABLES')}))
"""


def _probe(**env) -> dict:
    full = {k: v for k, v in os.environ.items()
            if k not in ('GLIBC_TUNABLES', 'WALS_TUNE_MALLOC')}
    full.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, '-c', PROBE], env=full, check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_big_arrays_come_from_the_heap_once_tuned():
    tuned = _probe()
    assert tuned['tuned'] is True
    assert tuned['mapped'] < (1 << 20)                  # not a fresh mmap
    assert tuned['thread_mapped'] < (1 << 20)           # a thread shares the heap
    assert 'glibc.malloc.arena_max=1' in tuned['tunables']
    assert 'glibc.malloc.mmap_threshold=1073741824' in tuned['tunables']
    off = _probe(WALS_TUNE_MALLOC='0')
    assert off['tuned'] is False and off['tunables'] is None
    assert off['mapped'] >= (100 << 20)                 # glibc's default: mmapped
    assert off['thread_mapped'] >= (100 << 20)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_a_users_glibc_tunables_are_left_alone():
    assert _probe(GLIBC_TUNABLES='glibc.malloc.arena_max=2')['tunables'] == \
        'glibc.malloc.arena_max=2'

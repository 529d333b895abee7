"""Shared test fixtures: MovieLens 100k from ../shared and small rating files."""
from __future__ import annotations

import importlib.util
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / 'shared' / 'data' / 'ml-100k' / 'u.data'


@pytest.fixture(scope='session')
def ml100k() -> pathlib.Path:
    if not ML100K.exists():
        if os.environ.get('CI'):
            pytest.fail(f'{ML100K} is missing (CI must have ../shared)')
        pytest.skip(f'{ML100K} not found')
    return ML100K


def write_ratings(path: pathlib.Path, users, items, ratings, delimiter: str = '\t') -> pathlib.Path:
    """A ratings file: user, item, rating, timestamp per line."""
    with open(path, 'w', encoding='utf-8') as f:
        for u, i, r in zip(users, items, ratings):
            f.write(f'{u}{delimiter}{i}{delimiter}{r}{delimiter}881250949\n')
    return path


@pytest.fixture
def small_ratings(tmp_path) -> pathlib.Path:
    """~3000 random ratings of 120 users on 80 items, no duplicate pairs."""
    rng = np.random.default_rng(7)
    pairs = rng.choice(120 * 80, size=3000, replace=False)
    users, items = pairs // 80 + 1, pairs % 80 + 1
    return write_ratings(tmp_path / 'ratings.tsv', users, items, rng.integers(1, 6, size=3000))


def _check_unchanged():
    spec = importlib.util.spec_from_file_location(
        'check_unchanged', ROOT / 'scripts' / 'check_unchanged.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def output_hashes(folder: pathlib.Path) -> dict[str, str]:
    """SHA-256 of every file of a command's output folder, as scripts/check_unchanged.py
    compares them: JSON outputs without wall-clock fields, the folder's own path
    replaced (two runs in different folders compare equal)."""
    return _check_unchanged().hash_tree(pathlib.Path(folder), str(folder))


def assert_same_outputs(a: pathlib.Path, b: pathlib.Path) -> dict[str, str]:
    """Two output folders hold the same files with the same hashes (see output_hashes)."""
    ha, hb = output_hashes(a), output_hashes(b)
    assert ha, f'{a}: no output'
    differ = sorted(f for f in set(ha) | set(hb) if ha.get(f) != hb.get(f))
    assert not differ, f'{a.name} and {b.name} differ: {differ}'
    return ha

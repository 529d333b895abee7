"""Tests of pipeline.io.synth: the synthetic MovieLens-shaped ratings generator."""
from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.io.synth import PRESETS, ensure_sample, generate_ratings, write_movielens
from pipeline.cli.synth import main as synth_main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = dict(num_users=943, num_items=1682, num_ratings=100_000)  # MovieLens 100k's shape
LINE = re.compile(rb'[1-9]\d*\t[1-9]\d*\t[1-5]\t\d{9,10}\n')

# 1997-01-01 and 1999-01-01 UTC: MovieLens 100k was collected in between.
Y1997, Y1999 = 852_076_800, 915_148_800


@pytest.fixture(scope='module')
def sample():
    return generate_ratings(**SAMPLE)


def read_back(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep='\t', header=None, dtype=np.int64)


def test_presets_have_the_movielens_shapes():
    assert PRESETS['sample'] == SAMPLE
    assert PRESETS['ml-1m'] == dict(num_users=6040, num_items=3706, num_ratings=1_000_000)
    assert PRESETS['ml-10m'] == dict(num_users=69_878, num_items=10_677, num_ratings=10_000_000)
    assert PRESETS['ml-20m'] == dict(num_users=138_493, num_items=26_744, num_ratings=20_000_000)


def test_same_seed_gives_identical_arrays_and_another_seed_differs(sample):
    again = generate_ratings(**SAMPLE)
    for a, b in zip(sample, again):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    other = generate_ratings(**SAMPLE, seed=1)
    assert not np.array_equal(sample[1], other[1])   # different pairs
    assert not np.array_equal(sample[3], other[3])   # different timestamps


def test_dtypes(sample):
    users, items, ratings, stamps = sample
    assert (users.dtype, items.dtype, ratings.dtype, stamps.dtype) == (
        np.int64, np.int64, np.float32, np.int64)
    assert all(a.ndim == 1 for a in sample)


def test_exact_count_no_duplicate_pairs_sorted_by_user_then_item(sample):
    users, items, ratings, stamps = sample
    assert users.size == items.size == ratings.size == stamps.size == SAMPLE['num_ratings']
    key = users * (SAMPLE['num_items'] + 1) + items
    assert np.unique(key).size == key.size
    assert np.all(np.diff(key) > 0)  # documented order: by user, then item


@pytest.mark.parametrize('num_users,num_items,num_ratings', [
    (1, 1, 1),
    (7, 5, 35),        # every pair
    (30, 20, 599),     # all pairs but one
    (50, 40, 500),
    (200, 10, 150),    # fewer ratings than users: no coverage promise
    (3, 1000, 40),
    (1000, 3, 2500),
])
def test_odd_shapes_exact_and_distinct(num_users, num_items, num_ratings):
    users, items, ratings, _ = generate_ratings(num_users, num_items, num_ratings, seed=5)
    assert users.size == num_ratings
    assert np.unique(users * num_items + items).size == num_ratings
    assert users.min() >= 1 and users.max() <= num_users
    assert items.min() >= 1 and items.max() <= num_items
    if num_ratings >= max(num_users, num_items):
        assert np.unique(users).size == num_users
        assert np.unique(items).size == num_items
    assert set(np.unique(ratings)) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_extreme_exponents_still_give_exact_distinct_pairs():
    users, items, _, _ = generate_ratings(2000, 500, 100_000, user_alpha=4.0, item_alpha=4.0)
    assert np.unique(users * 500 + items).size == 100_000
    assert np.unique(users).size == 2000 and np.unique(items).size == 500


def test_ids_in_range_and_every_user_and_item_present(sample):
    users, items, _, _ = sample
    np.testing.assert_array_equal(np.unique(users), np.arange(1, 944))
    np.testing.assert_array_equal(np.unique(items), np.arange(1, 1683))
    # The budget (106 per user) allows MovieLens's minimum of 20 ratings per user.
    assert np.bincount(users)[1:].min() >= 20


def test_ratings_are_integers_1_to_5_with_a_movielens_like_spread(sample):
    ratings = sample[2]
    values, counts = np.unique(ratings, return_counts=True)
    np.testing.assert_array_equal(values, [1, 2, 3, 4, 5])
    shares = counts / ratings.size
    assert shares.min() > 0.02                      # every value really used
    assert shares[3] > shares[0] and shares[3] > shares[1]   # 4 more common than 1 or 2
    assert 3.0 < ratings.mean() < 4.0
    assert 0.8 < ratings.std() < 1.4


def test_ratings_carry_user_and_item_structure(sample):
    users, items, ratings, _ = sample
    # A user's mean rating on odd items predicts the mean on even items (user bias
    # and factors); independent ratings would give a correlation near 0.
    odd = items % 2 == 1

    def user_means(mask):
        return np.bincount(users[mask], ratings[mask], minlength=944)[1:] / np.bincount(
            users[mask], minlength=944)[1:]

    assert np.corrcoef(user_means(odd), user_means(~odd))[0, 1] > 0.3


def test_noise_widens_the_rating_spread():
    calm = generate_ratings(300, 200, 10_000, noise=0.0)[2]
    noisy = generate_ratings(300, 200, 10_000, noise=2.0)[2]
    assert noisy.std() > calm.std() + 0.2


def test_power_law_popularity(sample):
    _, items, _, _ = sample
    per_item = np.sort(np.bincount(items)[1:])[::-1]
    top_share = per_item[:per_item.size // 10].sum() / per_item.sum()
    assert top_share > 0.30
    # The exponent is what makes it: uniform popularity gives a flat top 10%.
    flat = generate_ratings(**SAMPLE, item_alpha=0.0)[1]
    per_item = np.sort(np.bincount(flat)[1:])[::-1]
    assert per_item[:per_item.size // 10].sum() / per_item.sum() < 0.2


def test_user_activity_is_skewed(sample):
    per_user = np.bincount(sample[0])[1:]
    assert per_user.max() > 4 * np.median(per_user)


def test_timestamps_plausible(sample):
    stamps = sample[3]
    assert stamps.min() >= Y1997 and stamps.max() < Y1999
    assert stamps.max() - stamps.min() > 100 * 86_400


@pytest.mark.parametrize('name', ['u.data', 'u.data.gz'])
def test_write_movielens_round_trip(tmp_path, name):
    users, items, ratings, stamps = generate_ratings(120, 90, 3000, seed=2)
    path = tmp_path / name
    write_movielens(str(path), users, items, ratings, stamps)
    raw = path.read_bytes()
    if name.endswith('.gz'):
        assert raw[:2] == b'\x1f\x8b'
        raw = gzip.decompress(raw)
    lines = raw.splitlines(keepends=True)
    assert len(lines) == 3000
    assert all(LINE.fullmatch(line) for line in lines)   # 4 tab-separated integers
    back = read_back(path)                                # pandas infers gzip from .gz
    assert back.shape == (3000, 4)
    np.testing.assert_array_equal(back[0], users)
    np.testing.assert_array_equal(back[1], items)
    np.testing.assert_array_equal(back[2], ratings.astype(np.int64))
    np.testing.assert_array_equal(back[3], stamps)
    assert sorted(os.listdir(tmp_path)) == [name]          # no temporary file left


def test_write_movielens_exact_text_and_reproducible_gzip(tmp_path):
    args = (np.array([1, 10, 943]), np.array([7, 1682, 100]), np.array([5.0, 1.0, 3.0], np.float32),
            np.array([874724710, 0, 893286638]))
    write_movielens(str(tmp_path / 'a'), *args)
    assert (tmp_path / 'a').read_bytes() == (
        b'1\t7\t5\t874724710\n10\t1682\t1\t0\n943\t100\t3\t893286638\n')
    write_movielens(str(tmp_path / 'a.gz'), *args)
    first = (tmp_path / 'a.gz').read_bytes()
    write_movielens(str(tmp_path / 'a.gz'), *args)   # replaces it, byte for byte (no mtime)
    assert (tmp_path / 'a.gz').read_bytes() == first
    assert gzip.decompress(first) == (tmp_path / 'a').read_bytes()


def test_write_movielens_rejects_fractional_ratings_and_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match='whole'):
        write_movielens(str(tmp_path / 'u.data'), np.array([1]), np.array([1]),
                        np.array([3.5], np.float32), np.array([0]))
    assert list(tmp_path.iterdir()) == []


def test_ensure_sample_writes_once(tmp_path):
    path = tmp_path / 'nested' / 'u.data'
    assert ensure_sample(str(path)) == str(path)
    back = read_back(path)
    assert back.shape == (100_000, 4)
    assert back[0].nunique() == 943 and back[1].nunique() == 1682
    np.testing.assert_array_equal(back[1], generate_ratings(**SAMPLE)[1])
    path.write_text('kept\n')          # an existing file is left alone
    assert ensure_sample(str(path)) == str(path)
    assert path.read_text() == 'kept\n'
    assert os.listdir(path.parent) == ['u.data']


def test_ensure_sample_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match='preset'):
        ensure_sample(str(tmp_path / 'u.data'), preset='ml-100m')


@pytest.mark.parametrize('num_users,num_items,num_ratings', [
    (10, 10, 101), (0, 10, 5), (10, 0, 5), (10, 10, 0), (-1, 10, 5), (10, 10, -3)])
def test_impossible_sizes_raise(num_users, num_items, num_ratings):
    with pytest.raises(ValueError):
        generate_ratings(num_users, num_items, num_ratings)


def test_too_many_ratings_message_names_the_pairs():
    with pytest.raises(ValueError, match=r'num_ratings=101 .* 100 distinct'):
        generate_ratings(10, 10, 101)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'pipeline.synth', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_writes_the_file(tmp_path):
    out = tmp_path / 'r.data'
    done = run_cli('--output', str(out), '--users', '50', '--items', '40', '--ratings', '500',
                   '--seed', '3')
    assert done.returncode == 0, done.stderr
    assert '500' in done.stdout and str(out) in done.stdout
    back = read_back(out)
    users, items, ratings, stamps = generate_ratings(50, 40, 500, seed=3)
    np.testing.assert_array_equal(back[0], users)
    np.testing.assert_array_equal(back[1], items)
    np.testing.assert_array_equal(back[2], ratings)
    np.testing.assert_array_equal(back[3], stamps)


def test_cli_preset_and_gzip(tmp_path):
    out = tmp_path / 'sample.data.gz'
    done = run_cli('--output', str(out), '--preset', 'sample', '--rank', '4', '--noise', '0.3')
    assert done.returncode == 0, done.stderr
    assert read_back(out).shape == (100_000, 4)


def test_cli_rejects_impossible_sizes(tmp_path):
    out = tmp_path / 'r.data'
    done = run_cli('--output', str(out), '--users', '5', '--items', '5', '--ratings', '26')
    assert done.returncode == 2
    assert 'error' in done.stderr and '25' in done.stderr
    assert not out.exists()


@pytest.mark.parametrize('args', [
    ['--users', '5', '--items', '5'],                          # --ratings missing
    ['--preset', 'sample', '--users', '5', '--items', '5', '--ratings', '5'],
    ['--preset', 'nope'],
])
def test_cli_rejects_bad_options(tmp_path, capsys, args):
    out = tmp_path / 'r.data'
    with pytest.raises(SystemExit) as exit_:
        synth_main(['--output', str(out), *args])
    assert exit_.value.code == 2
    assert 'error' in capsys.readouterr().err
    assert not out.exists()

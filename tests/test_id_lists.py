"""Lists of IDs (issue 18 §6): --users, --items and --new_user_ratings split on \\n only
(and a \\r before it), as the training input does, with one helper
(pipeline.io.lines.split_lines): an ID holding \\x0b, \\x0c, \\x1c, \\x1d, \\x1e, \\x85,
\\u2028 or \\u2029 (which str.splitlines() breaks on) that training kept can be
asked for."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from pipeline.io.id_lists import read_id_file, read_new_user_ratings
from pipeline.io.lines import split_lines
from pipeline.options import ConfigError
from pipeline.serving.recommender import Recommender
from tests.conftest import ROOT
from tests.pipeline_support import run_pipeline

SEPARATORS = {'VT': '\x0b', 'FF': '\x0c', 'FS': '\x1c', 'GS': '\x1d', 'RS': '\x1e',
              'NEL': '\x85', 'LS': '\u2028', 'PS': '\u2029'}


def user_of(sep: str) -> str:
    return f'user{sep}x'


def item_of(sep: str) -> str:
    return f'item{sep}y'


@pytest.mark.parametrize('name', sorted(SEPARATORS))
def test_split_lines_breaks_on_newline_only(name):
    sep = SEPARATORS[name]
    assert split_lines(f'a{sep}b\nc\r\n\nd{sep}') == [f'a{sep}b', 'c', '', f'd{sep}']
    assert len(f'a{sep}b'.splitlines()) == 2     # what the old reader did


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> dict:
    """A model whose users and items include an ID with each separator, and the
    batch recommendations and similar items for lists of those IDs."""
    root = tmp_path_factory.mktemp('ids')
    rng = np.random.default_rng(11)
    lines = [f'u{u}\ti{i}\t{r}' for u, i, r in zip(rng.integers(0, 60, 1500),
                                                  rng.integers(0, 40, 1500),
                                                  rng.integers(1, 6, 1500))]
    for sep in SEPARATORS.values():
        lines += [f'{user_of(sep)}\ti{i}\t{1 + i % 5}' for i in range(12)]
        lines += [f'u{u}\t{item_of(sep)}\t{1 + u % 5}' for u in range(12)]
    src = root / 'ratings.tsv'
    src.write_bytes(('\n'.join(lines) + '\n').encode('utf-8'))
    model = root / 'model'
    run_pipeline(src, model, '--num_iters', '2', '--latent_factors', '4',
                 '--test_fraction', '0')
    users = root / 'users.txt'
    users.write_bytes(''.join(f'{user_of(s)}\r\n' for s in SEPARATORS.values()).encode())
    items = root / 'items.txt'
    items.write_bytes(''.join(f'{item_of(s)}\n' for s in SEPARATORS.values()).encode())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = {}
    for kind, args in (('users', ['--users', users]),
                       ('items', ['--similar_items', '--items', items])):
        out[kind] = root / f'recs-{kind}'
        subprocess.run([sys.executable, '-m', 'pipeline.recommend', '--model', str(model),
                        '--output', str(out[kind]), *map(str, args)], cwd=ROOT, env=env,
                       check=True, capture_output=True, timeout=600)
    return {'root': root, 'model': model, **out}


def batch_keys(folder: pathlib.Path, key: str) -> set[str]:
    """The query IDs of JSON Lines shards (lines end with \n; \x85 and \u2028 may
    stand unescaped inside a JSON string)."""
    return {json.loads(line)[key] for f in folder.glob('*.jsonl')
            for line in split_lines(f.read_text(encoding='utf-8'))}


def unknown(folder: pathlib.Path) -> str:
    return ''.join(f.read_text(encoding='utf-8') for f in (folder / 'errors').glob('unknown_*'))


@pytest.mark.parametrize('name', sorted(SEPARATORS))
def test_a_user_id_with_the_separator_can_be_requested(trained, name):
    sep = SEPARATORS[name]
    assert user_of(sep) in batch_keys(trained['users'], 'user')
    assert unknown(trained['users']) == ''


@pytest.mark.parametrize('name', sorted(SEPARATORS))
def test_an_item_id_with_the_separator_can_be_requested(trained, name):
    sep = SEPARATORS[name]
    assert item_of(sep) in batch_keys(trained['items'], 'item')
    assert unknown(trained['items']) == ''


@pytest.mark.parametrize('name', sorted(SEPARATORS))
def test_a_new_users_rating_of_such_an_item_is_read(trained, tmp_path, name):
    sep = SEPARATORS[name]
    path = tmp_path / 'me.tsv'
    path.write_bytes(f'{item_of(sep)}\t5\r\ni3,4\n'.encode('utf-8'))
    ratings = read_new_user_ratings(str(path))
    assert ratings == [(item_of(sep), 5.0), ('i3', 4.0)]
    rec = Recommender.load(str(trained['model']))
    got = [item for item, _ in rec.recommend_new_user(ratings, k=50)]
    assert got and item_of(sep) not in got and 'i3' not in got     # rated: left out


def test_an_empty_list_is_an_error(tmp_path):
    path = tmp_path / 'users.txt'
    path.write_text('\n  \n\r\n')
    with pytest.raises(ConfigError, match='lists no ID'):
        read_id_file(str(path), '--users')

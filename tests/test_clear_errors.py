"""Tracebacks where a clear error belongs, and output that is not what it says (issue
18 §7, §8, the input and command-line items): hostile command lines run as real
processes; each must exit with its documented code, print one `error:` line naming
the file or option at fault and no traceback, and leave nothing new on disk (a
trials table of failed trials is the tuner's report). Each case printed a
traceback, exited 0 with a wrong result, or hung before."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import pathlib
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest

from tests.conftest import ROOT, write_ratings
from tests.pipeline_support import run_pipeline

ERROR = re.compile(r'(python -m pipeline\.\w+: |wals \w+: )?error: ')


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Small ratings, damaged copies of them and a model trained on them."""
    root = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(5)
    pairs = rng.choice(60 * 40, 1200, replace=False)
    ratings = write_ratings(root / 'ratings.tsv', pairs // 40 + 1, pairs % 40 + 1,
                            rng.integers(1, 6, 1200))
    text = ratings.read_bytes()
    out = {'ratings': ratings, 'model': root / 'model', 'root': root}
    run_pipeline(ratings, out['model'], '--num_iters', '2', '--latent_factors', '3')
    gz = bytearray(gzip.compress(text))
    gz[len(gz) // 2] ^= 0x55
    files = {
        'corrupt.tsv.gz': bytes(gz),
        'plain-text.tsv.gz': text,
        'cut.tsv.bz2': bz2.compress(text)[:2000],
        'cut.tsv.xz': lzma.compress(text)[:3000],
        'cut.tsv.deflate': zlib.compress(text)[:3000],
        'nan.tsv': b'1\tnan\n',
        'inf.tsv': b'1\t-inf\n',
        'huge.tsv': b'1\t1e300\n2\t5\n',
        'no-users.txt': b'\n \n',
    }
    for name, content in files.items():
        out[name] = root / name
        out[name].write_bytes(content)
    out['folder'] = root / 'a-folder'
    out['folder'].mkdir()
    (out['folder'] / 'x.tsv').write_bytes(text)
    return out


# (id, command, arguments with {name} placeholders, exit code, texts of the error line)
CASES = [
    ('train corrupt gz', 'train', ['--input', '{corrupt.tsv.gz}'], 1,
     ['{corrupt.tsv.gz}', 'corrupt gzip data']),
    ('train gz that is not gzip', 'train', ['--input', '{plain-text.tsv.gz}'], 2,
     ['{plain-text.tsv.gz}', 'corrupt gzip data']),
    ('train truncated bz2', 'train', ['--input', '{cut.tsv.bz2}'], 2,
     ['{cut.tsv.bz2}', 'truncated']),
    ('train truncated xz', 'train', ['--input', '{cut.tsv.xz}'], 1,
     ['{cut.tsv.xz}', 'truncated']),
    ('train truncated deflate', 'train', ['--input', '{cut.tsv.deflate}'], 1,
     ['{cut.tsv.deflate}', 'truncated']),
    ('train test_input folder', 'train', ['--input', '{ratings}', '--test_input', '{folder}'],
     2, ['--test_input', '{folder}', 'directory']),
    ('train regularization inf', 'train', ['--input', '{ratings}', '--regularization', 'inf'],
     2, ['--regularization']),
    ('train unobs_weight inf', 'train', ['--input', '{ratings}', '--unobs_weight', 'inf'], 2,
     ['--unobs_weight']),
    ('train block_size past int32', 'train',
     ['--input', '{ratings}', '--block_size', '99999999999999999999'], 2, ['--block_size']),
    ('train relevance_threshold nan', 'train',
     ['--input', '{ratings}', '--relevance_threshold', 'nan'], 2, ['--relevance_threshold']),
    ('recommend new user nan', 'recommend',
     ['--model', '{model}', '--new_user_ratings', '{nan.tsv}'], 2,
     ['--new_user_ratings', '{nan.tsv}', 'line 1', 'not a finite number']),
    ('recommend new user -inf', 'recommend',
     ['--model', '{model}', '--new_user_ratings', '{inf.tsv}'], 2,
     ['--new_user_ratings', '{inf.tsv}', 'not a finite number']),
    ('recommend new user 1e300 json', 'recommend',
     ['--model', '{model}', '--new_user_ratings', '{huge.tsv}', '--json'], 2,
     ['--new_user_ratings', '{huge.tsv}', 'line 1', 'out of range']),
    ('recommend empty users list', 'recommend',
     ['--model', '{model}', '--output', '{out}', '--users', '{no-users.txt}'], 2,
     ['--users', '{no-users.txt}', 'lists no ID']),
    ('tune wt_type for implicit', 'tune',
     ['--input', '{ratings}', '--output', '{out}', '--model', 'implicit', '--wt_type', 'log'],
     2, ['--wt_type', 'implicit']),
    ('tune corrupt gz', 'tune', ['--input', '{corrupt.tsv.gz}', '--output', '{out}'], 1,
     ['{corrupt.tsv.gz}', 'corrupt gzip data']),
    ('tune input folder', 'tune', ['--input', '{folder}', '--output', '{out}'], 2,
     ['--input', '{folder}', 'directory']),
    ('tune glob matching nothing', 'tune',
     ['--input', '{root}/nothing-*.tsv', '--output', '{out}'], 2,
     ['no file matches --input', 'nothing-*.tsv']),
    ('tune every trial fails', 'tune',
     ['--input', '{ratings}', '--output', '{out}', '--metric', 'ndcg',
      '--relevance_threshold', '100', '--trials', '2', '--num_iters', '1'], 1,
     ['every trial failed (2 of 2)']),
    ('synth into a missing folder', 'synth', ['--output', '{root}/missing/x.tsv'], 2,
     ['--output', 'does not exist']),
    ('synth onto a folder', 'synth', ['--output', '{folder}'], 2, ['--output', 'is a folder']),
]


def fill(text: str, data: dict, out: pathlib.Path) -> str:
    names = {k: str(v) for k, v in data.items()}
    names['out'] = str(out)
    return re.sub(r'\{([^}]+)\}', lambda m: names[m.group(1)], text)


def snapshot(folder: pathlib.Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob('*')}


@pytest.mark.parametrize('name, command, args, code, texts', CASES, ids=[c[0] for c in CASES])
def test_a_hostile_command_line_gets_one_clear_line(data, tmp_path, name, command, args,
                                                    code, texts):
    out = tmp_path / 'out'
    argv = [fill(a, data, out) for a in args]
    if command == 'train':
        argv += ['--output', str(out), '--num_iters', '1']
    if command == 'tune':
        argv += ['--trials', '1'] if '--trials' not in argv else []
    before = snapshot(data['root']), snapshot(tmp_path)
    proc = subprocess.run([sys.executable, '-m', f'pipeline.{command}', *argv], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if ERROR.match(line)]
    assert len(errors) == 1, proc.stderr[-3000:]
    for text in texts:
        assert fill(text, data, out) in errors[0], errors[0]
    assert snapshot(data['root']) == before[0]
    report = {'out', 'out/trials.csv'} if name == 'tune every trial fails' else set()
    assert snapshot(tmp_path) - before[1] <= report
    if name == 'tune every trial fails':    # each trial's error, after the one line
        assert sum(line.startswith('  trial ') for line in proc.stderr.splitlines()) == 2
        assert 'ndcg_at_10 is nan' in proc.stderr


def test_a_top_k_beyond_the_items_gives_every_item(data, capsys):
    """Before: --top_k 99999999999999999999 failed allocating the kernel's arrays."""
    from pipeline.cli import recommend
    from pipeline.store.model_files import load_model_files
    files = load_model_files(str(data['model']))
    indptr, _ = files.load_seen()
    seen = int(indptr[1] - indptr[0])           # the first user's rated items
    user = files.users[0].item()
    assert recommend.main(['--model', str(data['model']), '--user', str(user),
                           '--top_k', '99999999999999999999']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(files.items) - seen

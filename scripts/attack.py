"""Runs issue 18's list of hostile and unlucky inputs against a checkout, as a new
user would (real processes, real files), and prints one row per case: what the
command did and whether that was handled (a correct result, or one clear line, the
documented non-zero exit and nothing lost or published).

    python scripts/attack.py                       # this checkout
    python scripts/attack.py --repo OTHER_CHECKOUT --out table.md

MovieLens 100k (../shared/data/ml-100k/u.data) is the data, as in the issue. A case
is "handled" when: the exit code is the expected one, stderr holds no traceback,
every file the case protects is unchanged, and nothing was published when the run
failed. Otherwise the row says what went wrong.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ML100K = ROOT.parent / 'shared' / 'data' / 'ml-100k' / 'u.data'
SMALL = ['--num_iters', '2', '--latent_factors', '3']


@dataclass
class Case:
    section: str
    name: str
    argv: list[str]                 # after `python -m`
    expect: set[int]                # acceptable exit codes
    protect: list[str] = field(default_factory=list)   # files that must not change
    absent: list[str] = field(default_factory=list)    # must not exist afterwards
    present: list[str] = field(default_factory=list)   # must exist afterwards
    stdout_forbids: str = ''        # text the stdout must not contain
    stderr_needs: str = ''          # text the error line must hold
    setup: object = None            # callable(work) run before the command
    post: object = None             # callable(work) -> a problem or None, run after
    timeout: float = 300


def snapshot(work: Path, names: list[str]) -> dict:
    out = {}
    for name in names:
        p = work / name
        if p.is_dir():
            for f in sorted(p.rglob('*')):
                if f.is_file():
                    out[str(f.relative_to(work))] = hashlib.sha256(f.read_bytes()).hexdigest()
        elif p.exists():
            out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[name] = None
    return out


def prepare(work: Path, python: str, env: dict) -> None:
    lines = ML100K.read_text().splitlines(keepends=True)
    (work / 'data.tsv').write_text(''.join(lines[:5000]))
    raw = (work / 'data.tsv').read_bytes()
    gz, bz = gzip.compress(raw), bz2.compress(raw)
    (work / 'cut.gz').write_bytes(gz[:len(gz) // 2])
    (work / 'cut.bz2').write_bytes(bz[:len(bz) // 2])
    bad = bytearray(gz)
    bad[len(bad) // 2:len(bad) // 2 + 64] = b'\x00' * 64
    (work / 'corrupt.gz').write_bytes(bytes(bad))
    (work / 'ml1e20.tsv').write_text(ML100K.read_text() + '1\t1\t1e20\t0\n')
    (work / 'ml1e300.tsv').write_text(ML100K.read_text() + '1\t1\t1e300\t0\n')
    (work / 'zeros.tsv').write_text(''.join(
        '\t'.join([*line.split('\t')[:2], '0']) + '\n' for line in lines[:5000]))
    subprocess.run([python, '-m', 'pipeline.train', '--input', str(work / 'data.tsv'),
                    '--output', str(work / 'model'), *SMALL], env=env, cwd=work,
                   capture_output=True, check=True, timeout=600)
    shutil.copytree(work / 'model', work / 'nocol')
    (work / 'nocol' / 'model' / 'col.npy').unlink()
    shutil.copytree(work / 'model', work / 'forged')
    import numpy as np
    np.save(work / 'forged' / 'model' / 'col.npy', np.array([object()] * 3, dtype=object),
            allow_pickle=True)
    (work / 'nan.txt').write_text('1\tnan\n')
    (work / 'huge.txt').write_text('1\t1e300\n')
    (work / 'empty_users.txt').write_text('')
    (work / 'afile').write_text('not a folder\n')


def collapsed(folder: str):
    """A check: no user and no item with training ratings has an all-zero vector
    (every MovieLens user has 20 ratings or more; an item's training ratings are
    model/col_counts.npy). A model that has such vectors collapsed."""
    def check(work: Path) -> str | None:
        import numpy as np
        model = work / folder / 'model'
        if not (model / 'row.npy').exists() or not (model / 'col.npy').exists():
            return 'row.npy or col.npy missing'
        row, col = np.load(model / 'row.npy'), np.load(model / 'col.npy')
        counts = np.load(model / 'col_counts.npy')
        zero_rows = int((~row.any(axis=1)).sum())
        zero_cols = int((~col.any(axis=1) & (counts > 0)).sum())
        if zero_rows or zero_cols:
            return (f'{zero_rows} of {len(row)} user and {zero_cols} of '
                    f'{int((counts > 0).sum())} item vectors with training ratings are '
                    'all zero (collapsed model)')
        return None
    return check


def cases(work: Path) -> list[Case]:
    def w2(work: Path) -> None:
        (work / 'w2').mkdir()
        shutil.copy(work / 'data.tsv', work / 'w2' / 'data.tsv')
        (work / 'w2' / 'notes.txt').write_text('mine\n')

    def readonly_parent(work: Path) -> None:
        (work / 'ro').mkdir()
        if os.geteuid() == 0:     # root ignores permission bits: make it immutable
            subprocess.run(['chattr', '+i', str(work / 'ro')], check=True)
        else:
            os.chmod(work / 'ro', stat.S_IRUSR | stat.S_IXUSR)

    def fifo(work: Path) -> None:
        os.mkfifo(work / 'pipe')

    def with_id_sep(work: Path) -> None:
        # a user ID holding \x85 (valid in training input): must be requested
        (work / 'sep.tsv').write_text('u\x85x\t1\t5\nu\x85x\t2\t3\nb\t1\t4\nb\t3\t2\n')
        (work / 'sep_users.txt').write_text('u\x85x\n')

    def sep_model(work: Path) -> None:
        with_id_sep(work)

    train, rec, export, tune = (['pipeline.train'], ['pipeline.recommend'],
                                ['pipeline.export'], ['pipeline.tune'])
    return [
        Case('1', '--overwrite on a folder with the input and a foreign file',
             train + ['--input', 'w2/data.tsv', '--output', 'w2', '--overwrite', *SMALL],
             {2}, protect=['w2'], setup=w2),
        Case('1', '--output inside --input\'s folder tree (output contains input)',
             train + ['--input', 'data.tsv', '--output', '.', '--overwrite', *SMALL],
             {2}, protect=['data.tsv']),
        Case('1', '--output is an existing file',
             train + ['--input', 'data.tsv', '--output', 'afile', *SMALL], {2},
             protect=['afile']),
        Case('1', '--output under a read-only parent',
             train + ['--input', 'data.tsv', '--output', 'ro/out', *SMALL], {2},
             absent=['ro/out'], setup=readonly_parent),
        Case('1', '--previous_model inside --output',
             train + ['--input', 'data.tsv', '--output', '.', '--previous_model', 'model',
                      '--overwrite', *SMALL], {2}, protect=['model']),
        Case('2', 'truncated .gz',
             train + ['--input', 'cut.gz', '--output', 'o_cutgz', *SMALL], {1, 2},
             absent=['o_cutgz'], stderr_needs='truncated'),
        Case('2', 'truncated .bz2',
             train + ['--input', 'cut.bz2', '--output', 'o_cutbz', *SMALL], {1, 2},
             absent=['o_cutbz'], stderr_needs='truncated'),
        Case('2', 'corrupt .gz',
             train + ['--input', 'corrupt.gz', '--output', 'o_corrupt', *SMALL], {1, 2},
             absent=['o_corrupt'], stderr_needs='corrupt'),
        Case('3', 'one rating of 1e20 in MovieLens 100k (bad line, model fine)',
             train + ['--input', 'ml1e20.tsv', '--output', 'o_1e20', *SMALL], {0},
             present=['o_1e20/_SUCCESS'], post=collapsed('o_1e20')),
        Case('3', 'one rating of 1e20 with --max_bad_fraction 0',
             train + ['--input', 'ml1e20.tsv', '--output', 'o_1e20b', '--max_bad_fraction',
                      '0', *SMALL], {1}, absent=['o_1e20b']),
        Case('3', 'one rating of 1e300',
             train + ['--input', 'ml1e300.tsv', '--output', 'o_1e300', *SMALL], {0},
             present=['o_1e300/_SUCCESS'], post=collapsed('o_1e300')),
        Case('3', '--model implicit on all-zero values',
             train + ['--input', 'zeros.tsv', '--output', 'o_zeros', '--model', 'implicit',
                      *SMALL], {1, 4}, absent=['o_zeros']),
        Case('4', 'two runs on one model root at once, each pruning to 1 version',
             ['sh', '-c', 'T="--input data.tsv --model_root root --num_iters 2 '
              '--latent_factors 3 --keep_versions 1"; "$PY" -m pipeline.train $T '
              '>/dev/null 2>&1 || exit 9; "$PY" -m pipeline.train $T & a=$!; '
              '"$PY" -m pipeline.train $T & b=$!; wait $a; ra=$?; wait $b; rb=$?; '
              'echo "exits $ra $rb" >&2; test $ra = 0 && test $rb = 0 && test -f root/LATEST'],
             {0}),
        Case('5', '--input /dev/zero',
             train + ['--input', '/dev/zero', '--output', 'o_zero', *SMALL], {2},
             absent=['o_zero'], timeout=120),
        Case('5', '--input a FIFO',
             train + ['--input', 'pipe', '--output', 'o_fifo', *SMALL], {2},
             absent=['o_fifo'], setup=fifo, timeout=120),
        Case('6', '--users with an ID holding \\x85',
             ['sh', '-c', '"$PY" -m pipeline.train --input sep.tsv --output sepm '
              '--num_iters 1 --latent_factors 2 --test_fraction 0 >/dev/null 2>&1 && '
              'exec "$PY" -m pipeline.recommend --model sepm --users sep_users.txt '
              '--output o_sep'], {0}, present=['o_sep/_SUCCESS'], setup=sep_model),
        Case('7', '--runner typo',
             train + ['--input', 'data.tsv', '--output', 'o_runner', '--runner',
                      'DirectRuner', *SMALL], {2}, absent=['o_runner']),
        Case('7', 'recommend on a model without col.npy',
             rec + ['--model', 'nocol', '--output', 'o_nocol'], {1}, absent=['o_nocol']),
        Case('7', 'export on a model without col.npy',
             export + ['--model', 'nocol', '--output', 'o_nocol_x'], {1},
             absent=['o_nocol_x']),
        Case('7', 'recommend on a forged object-array col.npy',
             rec + ['--model', 'forged', '--output', 'o_forged'], {1}, absent=['o_forged']),
        Case('7', '--new_user_ratings with nan',
             rec + ['--model', 'model', '--new_user_ratings', 'nan.txt'], {1, 2}),
        Case('7', 'tune when every trial fails',
             tune + ['--input', 'data.tsv', '--output', 'o_tune_fail', '--trials', '2',
                     '--num_iters', '1', '--metric', 'ndcg', '--relevance_threshold', '1e9'], {1, 2},
             absent=['o_tune_fail/best.json']),
        Case('7', 'export --output is a file',
             export + ['--model', 'model', '--output', 'afile'], {2}, protect=['afile']),
        Case('7', 'tune --output is a file',
             tune + ['--input', 'data.tsv', '--output', 'afile', '--trials', '1',
                     '--num_iters', '1'], {2}, protect=['afile']),
        Case('8', '--new_user_ratings 1e300 --json (strict JSON)',
             rec + ['--model', 'model', '--new_user_ratings', 'huge.txt', '--json'], {1, 2},
             stdout_forbids='Infinity'),
        Case('8', '--keep_versions without --model_root',
             train + ['--input', 'data.tsv', '--output', 'o_keep', '--keep_versions', '2',
                      *SMALL], {2}, absent=['o_keep']),
        Case('8', 'tune --wt_type with --model implicit',
             tune + ['--input', 'data.tsv', '--output', 'o_tune_wt', '--model', 'implicit',
                     '--wt_type', 'log', '--trials', '1'], {2}, absent=['o_tune_wt']),
        Case('8', 'export --version 0',
             export + ['--model', 'model', '--output', 'o_v0', '--version', '0'], {2},
             absent=['o_v0']),
        Case('8', 'recommend with an empty --users list',
             rec + ['--model', 'model', '--users', 'empty_users.txt', '--output', 'o_empty'],
             {1, 2}, absent=['o_empty']),
        Case('8', 'tune into a published model\'s folder',
             tune + ['--input', 'data.tsv', '--output', 'model', '--trials', '1',
                     '--num_iters', '1', '--overwrite'], {2}, protect=['model']),
    ]


def run_case(case: Case, work: Path, python: str, env: dict) -> tuple[int | None, str]:
    if case.setup:
        case.setup(work)
    before = snapshot(work, case.protect)
    argv = case.argv if case.argv[0] == 'sh' else [python, '-m', *case.argv]
    try:
        done = subprocess.run(argv, env={**env, 'PY': python}, cwd=work, capture_output=True,
                              text=True, errors='replace', timeout=case.timeout)
    except subprocess.TimeoutExpired:
        return None, f'no answer in {case.timeout:.0f} s'
    problems = []
    if done.returncode not in case.expect:
        problems.append(f'exit {done.returncode} (expected {sorted(case.expect)})')
    if 'Traceback (most recent call last)' in done.stderr:
        problems.append('traceback')
    if snapshot(work, case.protect) != before:
        problems.append('protected files changed or lost: ' + ', '.join(case.protect))
    for name in case.absent:
        if (work / name).exists():
            problems.append(f'{name} exists')
    for name in case.present:
        if not (work / name).exists():
            problems.append(f'{name} missing')
    if case.post and not problems:
        found = case.post(work)
        if found:
            problems.append(found)
    if case.stdout_forbids and case.stdout_forbids in done.stdout:
        problems.append(f'stdout holds {case.stdout_forbids}')
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error:') or ': error:' in line]
    message = (errors or lines or [''])[0][:160]
    if case.stderr_needs and case.stderr_needs not in ' '.join(errors):
        problems.append(f'no error line saying {case.stderr_needs!r}')
    if problems:
        return done.returncode, '; '.join(problems)
    return done.returncode, 'ok: done' if done.returncode == 0 else f'ok: {message}'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--repo', default=str(ROOT), help='checkout to attack')
    parser.add_argument('--python', default=sys.executable)
    parser.add_argument('--out', help='also write the table (Markdown) here')
    args = parser.parse_args(argv)
    repo = Path(args.repo).resolve()
    env = {**os.environ, 'PYTHONPATH': str(repo), 'PYTHONHASHSEED': '0',
           'TF_CPP_MIN_LOG_LEVEL': '3'}
    rows, mishandled = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.python, env)
        for case in cases(work):
            started = time.time()
            code, verdict = run_case(case, work, args.python, env)
            if not verdict.startswith('ok'):
                mishandled += 1
            rows.append(f'| {case.section} | {case.name} | {code} | '
                        f'{verdict.replace("|", "/")} |')
            print(rows[-1], f'({time.time() - started:.0f} s)', flush=True)
        if (work / 'ro').exists():          # the read-only folder: let the cleanup in
            if os.geteuid() == 0:
                subprocess.run(['chattr', '-i', str(work / 'ro')], check=False)
            os.chmod(work / 'ro', 0o755)
    table = '\n'.join(['| § | case | exit | verdict |', '| --- | --- | --- | --- |', *rows,
                       '', f'{len(rows)} cases, {mishandled} mishandled ({repo.name}).'])
    print(table.splitlines()[-1])
    if args.out:
        Path(args.out).write_text(table + '\n')
    return 1 if mishandled else 0


if __name__ == '__main__':
    sys.exit(main())

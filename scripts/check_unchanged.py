"""Proves that a change left the tool's behaviour unchanged: runs the same commands
on a base commit and on the working tree and compares the SHA-256 of every output.

    python scripts/check_unchanged.py --base 726a58f          # base vs working tree
    python scripts/check_unchanged.py --base main --cases train,recommend
    python scripts/check_unchanged.py --hashes out.json       # just record this tree

The base commit is checked out with `git worktree` into a temporary folder and run
with the same interpreter; each command runs in its own process through its
documented module entry point (python -m pipeline.train, ...), so a renamed module
behind an alias is still compared. Inputs: MovieLens 100k from ../shared (the test
data; never copied into the repo). Outputs compared:
- every file of a model folder (model/*.npy, model/seen/*.npz, errors/, the plot),
  metrics.json and report.json without wall-clock fields, trials.csv and best.json
  without seconds; _SUCCESS without its run id, timestamp and file list order;
- batch recommendations (every shard, byte for byte), one-user answers (stdout);
- the SavedModel's answers (not its bytes: TensorFlow writes ids into them) for a
  fixed list of users and items.
Paths inside outputs are written relative to the run folder first, so two runs in
different folders compare equal. Exit 0 when every hash matches, 1 otherwise (the
differing files are listed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / 'shared' / 'data' / 'ml-100k' / 'u.data'
TIMING_KEYS = {'phase_seconds', 'seconds', 'solve_seconds', 'published', 'updated',
               'run_id', 'model_run_id', 'started', 'finished', 'version',
               'manifest_sha256'}
# Files whose bytes hold wall-clock times: a manifest's checksums of them are dropped
# (the files themselves are compared scrubbed). trials.csv and best.json hold each
# trial's seconds, so a tuning's _SUCCESS differed between two runs of the same code.
TIMED_FILES = ('metrics.json', 'report.json', 'best.json', 'trials.csv')
CASES = ('train', 'rerun', 'recommend', 'export', 'tune')


def _scrub(value, base: str):
    """A JSON value without wall-clock fields, with `base` paths made relative."""
    if isinstance(value, dict):
        return {k: _scrub(v, base) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_scrub(v, base) for v in value]
    if isinstance(value, str):
        value = value.replace(base, '<RUN>')
        # version names and run ids: <UTC stamp>[Z]-<8 hex>
        return re.sub(r'\d{8}T\d{6}Z?-[0-9a-f]{8}', '<ID>', value)
    return value


def _digest(path: pathlib.Path, base: str) -> str:
    data = path.read_bytes()
    name = path.name
    if name in ('metrics.json', 'report.json', 'best.json', '_SUCCESS', 'LATEST'):
        value = json.loads(data)
        if name == '_SUCCESS':
            value['files'] = {f: v for f, v in value.get('files', {}).items()
                              if f.rsplit('/', 1)[-1] not in TIMED_FILES}
        data = json.dumps(_scrub(value, base), sort_keys=True).encode()
    elif name == 'trials.csv':
        lines = data.decode().splitlines()
        col = lines[0].split(',').index('seconds')
        data = '\n'.join(','.join(f for i, f in enumerate(line.split(',')) if i != col)
                         for line in lines).encode()
    elif name.endswith('.jsonl') and path.parent.name == 'errors':
        data = data.replace(base.encode(), b'<RUN>')
    return hashlib.sha256(data).hexdigest()


def hash_tree(folder: pathlib.Path, base: str) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob('*')):
        if path.is_file() and '.tmp-' not in str(path):
            rel = _scrub(str(path.relative_to(folder)), base)
            out[rel] = _digest(path, base)
    return out


def _run(code_root: pathlib.Path, work: pathlib.Path, *argv: str, stdin: str | None = None
         ) -> str:
    env = dict(os.environ, PYTHONPATH=str(code_root), WALS_TUNE_MALLOC='0')
    proc = subprocess.run([sys.executable, *argv], cwd=work, env=env, text=True,
                          capture_output=True, input=stdin)
    if proc.returncode not in (0, 3):
        raise SystemExit(f'{" ".join(argv)} failed in {code_root} (exit {proc.returncode}):\n'
                         f'{proc.stderr[-3000:]}')
    return proc.stdout


def run_cases(code_root: pathlib.Path, work: pathlib.Path, cases: list[str]) -> dict:
    """Runs the cases with the code at code_root inside `work`; returns hashes by case."""
    work.mkdir(parents=True, exist_ok=True)
    data = work / 'u.data'
    shutil.copyfile(ML100K, data)
    base = str(work)
    small = ['--block_size', '300', '--num_iters', '5']
    out: dict[str, dict] = {}
    if 'train' in cases or 'recommend' in cases or 'export' in cases or 'rerun' in cases:
        for model in ('wals', 'implicit', 'explicit'):
            _run(code_root, work, '-m', 'pipeline.train', '--input', str(data), '--output',
                 f'm-{model}', '--model', model, *small)
            out[f'train/{model}'] = hash_tree(work / f'm-{model}', base)
    if 'rerun' in cases:
        # two dumps into one model root: warm start, comparison, report and the gate
        lines = data.read_text().splitlines(keepends=True)
        first = work / 'dump1.tsv'
        first.write_text(''.join(lines[: len(lines) * 8 // 10]))
        for dump in (first, data):
            _run(code_root, work, '-m', 'pipeline.train', '--input', str(dump),
                 '--model_root', 'root', '--max_regression', '0.5', '--latent_factors', '4',
                 *small)
        versions = sorted((work / 'root' / 'versions').iterdir())
        for n, v in enumerate(versions):
            out[f'rerun/v{n}'] = hash_tree(v, base)
    if 'recommend' in cases:
        users = work / 'users.txt'
        users.write_text('1\n5\nnobody\n943\n5\n')
        items = work / 'items.txt'
        items.write_text('1\n50\n1682\n')
        me = work / 'me.tsv'
        me.write_text('50\t5\n172\t4\n1\t2\n')
        for model in ('wals', 'explicit'):
            m = f'm-{model}'
            for name, extra in (('jsonl', []), ('csv', ['--format', 'csv']),
                                ('parquet', ['--format', 'parquet']),
                                ('users', ['--users', str(users)]),
                                ('similar', ['--similar_items', '--items', str(items)])):
                dest = f'r-{model}-{name}'
                _run(code_root, work, '-m', 'pipeline.recommend', '--model', m, '--output',
                     dest, *extra)
                out[f'recommend/{model}/{name}'] = hash_tree(work / dest, base)
            one = _run(code_root, work, '-m', 'pipeline.recommend', '--model', m, '--user',
                       '196', '--json')
            new = _run(code_root, work, '-m', 'pipeline.recommend', '--model', m,
                       '--new_user_ratings', str(me), '--json')
            out[f'recommend/{model}/one_user'] = {
                'user': hashlib.sha256(one.encode()).hexdigest(),
                'new_user': hashlib.sha256(new.encode()).hexdigest()}
    if 'export' in cases:
        probe = ('import json, sys, tensorflow as tf\n'
                 'm = tf.saved_model.load(sys.argv[1])\n'
                 'u = tf.constant(["1", "196", "943", "nobody"]); i = tf.constant(["1", "50"])\n'
                 'r = m.signatures["recommend"](user_ids=u, k=tf.constant(10))\n'
                 's = m.signatures["similar_items"](item_ids=i, k=tf.constant(10))\n'
                 'print(json.dumps({k: v.numpy().tolist() for d in (r, s) '
                 'for k, v in sorted(d.items())}, default=lambda b: b.decode()))\n')
        for model in ('wals', 'explicit'):
            _run(code_root, work, '-m', 'pipeline.export', '--model', f'm-{model}',
                 '--output', f'e-{model}')
            answer = _run(code_root, work, '-c', probe, str(work / f'e-{model}' / '1'))
            out[f'export/{model}'] = {'answers': hashlib.sha256(answer.encode()).hexdigest()}
    if 'tune' in cases:
        _run(code_root, work, '-m', 'pipeline.tune', '--input', str(data), '--output',
             't-explicit', '--model', 'explicit', '--trials', '4', '--parallel', '2',
             '--num_iters', '3', '--sample_users', '400')
        out['tune/explicit'] = hash_tree(work / 't-explicit', base)
    return out


def compare(before: dict, after: dict) -> list[str]:
    problems = []
    for case in sorted(set(before) | set(after)):
        a, b = before.get(case), after.get(case)
        if a is None or b is None:
            problems.append(f'{case}: only in {"after" if a is None else "before"}')
            continue
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                problems.append(f'{case}: {name} differs '
                                f'({(a.get(name) or "missing")[:12]} -> '
                                f'{(b.get(name) or "missing")[:12]})')
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--base', help='commit to compare the working tree with')
    parser.add_argument('--cases', default=','.join(CASES),
                        help=f'comma-separated subset of {",".join(CASES)}')
    parser.add_argument('--hashes', help='only record the working tree\'s hashes here')
    parser.add_argument('--keep', action='store_true', help='keep the run folders')
    args = parser.parse_args()
    cases = [c for c in args.cases.split(',') if c]
    unknown = set(cases) - set(CASES)
    if unknown or not (args.base or args.hashes):
        parser.error(f'unknown case(s) {sorted(unknown)}' if unknown else
                     'give --base COMMIT or --hashes FILE')
    if not ML100K.exists():
        parser.error(f'{ML100K} not found (MovieLens 100k beside the repo)')
    tmp = pathlib.Path(tempfile.mkdtemp(prefix='wals-unchanged-'))
    try:
        after = run_cases(ROOT, tmp / 'after', cases)
        if args.hashes:
            pathlib.Path(args.hashes).write_text(json.dumps(after, indent=1, sort_keys=True))
            print(f'{sum(len(v) for v in after.values())} hashes of {len(after)} cases '
                  f'written to {args.hashes}')
            return 0
        tree = tmp / 'base-code'
        subprocess.run(['git', 'worktree', 'add', '--detach', '-q', str(tree), args.base],
                       cwd=ROOT, check=True)
        try:
            before = run_cases(tree, tmp / 'before', cases)
        finally:
            subprocess.run(['git', 'worktree', 'remove', '--force', str(tree)], cwd=ROOT,
                           check=False)
        problems = compare(before, after)
        files = sum(len(v) for v in after.values())
        if problems:
            print(f'{len(problems)} difference(s) between {args.base} and the working tree:')
            print('\n'.join(f'  {p}' for p in problems))
            return 1
        print(f'Unchanged: {files} output hashes in {len(after)} cases are identical '
              f'between {args.base} and the working tree.')
        for case, hashes in sorted(after.items()):
            print(f'  {case}: {len(hashes)} file(s)')
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())

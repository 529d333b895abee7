"""Nothing deleted that the tool did not write (issue 18 §1, and the output items of
§7 and §8), for every command that publishes: train, recommend, export, tune.

Each case runs the real command line on real files (subprocesses where the
process matters: kills, stops, exit codes) and checks both the refusal (exit 2,
one error line naming the file or option, no traceback, before any work) and that
nothing on disk changed. gs:// cases run against the local Cloud Storage server
(tests/gcs_support.py)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems

from pipeline.store.model_files import load_model_files
from pipeline.store.publish import SUCCESS
from tests.conftest import ROOT

SMALL = ['--num_iters', '1', '--latent_factors', '3', '--block_size', '64']
BUCKET = 'wals-output-safety'


# ---- helpers ---------------------------------------------------------------------

def env(extra: dict | None = None) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), **(extra or {}))


def cli(command: str, *args, extra_env: dict | None = None, cwd=None
        ) -> subprocess.CompletedProcess:
    """python -m pipeline.<command> ARGS, to the end."""
    return subprocess.run([sys.executable, '-m', f'pipeline.{command}', *map(str, args)],
                          cwd=cwd or ROOT, env=env(extra_env), capture_output=True,
                          text=True, timeout=900)


def start(command: str, *args, extra_env: dict | None = None,
          plan: list[dict] | None = None) -> subprocess.Popen:
    """python -m pipeline.<command> ARGS in the background; with a fault plan, through
    tests/fault_runner.py (e.g. [{'at': 'staged', 'do': 'kill'}])."""
    launch = ['-m', f'pipeline.{command}'] if plan is None else \
        ['-m', 'tests.fault_runner', json.dumps({'faults': plan}), '--', command]
    return subprocess.Popen([sys.executable, *launch, *map(str, args)],
                            cwd=ROOT, env=env(extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, text: str) -> str:
    """Reads the process's log until a line ends with text; returns the log so far."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.rstrip().endswith(text):
            return ''.join(seen)
    proc.wait()
    raise AssertionError(f'{text!r} never logged (exit {proc.returncode}):\n{"".join(seen)}')


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=900)
    return proc.returncode, out


def tree(folder: pathlib.Path) -> dict[str, bytes | str]:
    """Every file and symlink under folder (a symlink as its target)."""
    out = {}
    for path in sorted(folder.rglob('*')):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = f'-> {os.readlink(path)}'
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Asserts a refusal before any work: exit 2, the error as the last line
    (argparse's usage above it), no traceback, no training started. Returns it."""
    err = proc.stderr
    assert proc.returncode == 2, f'exit {proc.returncode}:\n{err[-3000:]}'
    assert 'Traceback' not in err, err
    assert 'Training ' not in err and 'staging in' not in err, err   # no work began
    last = err.strip().splitlines()[-1]
    assert ': error: ' in last, err
    for word in words:
        assert word in last, f'{word!r} not in {last!r}'
    return last


def refused_here(main, argv: list, capsys, *words: str) -> str:
    """refused() for a command's main() called in this process (the same code as
    its command line, without paying for a new interpreter and its imports)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    return refused(subprocess.CompletedProcess(argv, e.value.code, '', err), *words)


def leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if any(m in p.name for m in ('.tmp-', '.old-', '.lease-')))


def copy_model(src: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dest)
    return dest


def run_id(folder) -> str:
    return json.loads(pathlib.Path(folder, SUCCESS).read_text())['run_id']


def writable_again(folder: pathlib.Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(['chattr', '-i', str(folder)], check=True)
    else:
        folder.chmod(0o755)


@contextlib.contextmanager
def read_only(folder: pathlib.Path):
    """Makes a folder read-only for this user: chattr +i as root (root ignores
    permission bits), chmod 555 otherwise; skips where neither works."""
    if os.geteuid() == 0:
        done = subprocess.run(['chattr', '+i', str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f'cannot make a folder read-only here: {done.stderr.strip()}')
    else:
        folder.chmod(0o555)
    try:
        try:
            (folder / 'probe').write_text('x')
        except OSError:
            pass
        else:
            (folder / 'probe').unlink()
            pytest.skip('this filesystem ignores read-only folders')
        yield folder
    finally:
        with contextlib.suppress(Exception):
            writable_again(folder)


# ---- fixtures --------------------------------------------------------------------

@pytest.fixture(scope='module')
def ratings(tmp_path_factory) -> pathlib.Path:
    rng = np.random.default_rng(18)
    pairs = rng.choice(120 * 80, size=2000, replace=False)
    path = tmp_path_factory.mktemp('data') / 'ratings.tsv'
    path.write_text(''.join(f'{p // 80 + 1}\t{p % 80 + 1}\t{rng.integers(1, 6)}\n'
                            for p in pairs))
    return path


@pytest.fixture(scope='module')
def model(ratings, tmp_path_factory) -> pathlib.Path:
    """A model published by the real command line (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp('model') / 'model'
    proc = cli('train', '--input', ratings, '--output', out, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ---- train: only what this tool wrote is replaced --------------------------------

def test_overwrite_never_deletes_the_input_or_other_files(tmp_path, ratings):
    """The issue's case: `train --input w2/data.tsv --output w2 --overwrite` deleted
    w2/data.tsv and w2/notes.txt."""
    w2 = tmp_path / 'w2'
    w2.mkdir()
    shutil.copy(ratings, w2 / 'data.tsv')
    (w2 / 'notes.txt').write_text('my notes\n')
    before = tree(tmp_path)
    refused(cli('train', '--input', w2 / 'data.tsv', '--output', w2, '--overwrite',
                *SMALL), f'--output {w2} contains --input {w2}/data.tsv', 'overlaps')
    # the input elsewhere: w2 still holds two files this tool did not write
    last = refused(cli('train', '--input', ratings, '--output', w2, '--overwrite', *SMALL),
                   '2 file(s) this tool did not write: data.tsv, notes.txt',
                   'with or without --overwrite')
    assert 'pass --overwrite' not in last
    assert tree(tmp_path) == before


def test_foreign_files_beside_a_published_model_are_named_and_kept(tmp_path, model,
                                                                    ratings):
    out = copy_model(model, tmp_path / 'out')
    names = [f'notes-{i}.txt' for i in range(7)]
    for name in names:
        (out / name).write_text(name)
    before = tree(tmp_path)
    for extra in ([], ['--overwrite']):
        last = refused(cli('train', '--input', ratings, '--output', out, *extra, *SMALL),
                       '7 file(s) this tool did not write', '(7 in all)')
        assert sum(name in last for name in names) == 5        # a few of them, and the count
    assert tree(tmp_path) == before
    load_model_files(str(out))


def test_only_an_output_of_the_same_kind_is_replaced(tmp_path, model, ratings):
    recs = tmp_path / 'recs'
    proc = cli('recommend', '--model', model, '--output', recs, '--top_k', '2')
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = tree(tmp_path)
    refused(cli('train', '--input', ratings, '--output', recs, '--overwrite', *SMALL),
            'holds published batch recommendations, not model output')
    assert tree(tmp_path) == before


def _overlap_case(name: str, tmp: pathlib.Path, ratings: pathlib.Path, model: pathlib.Path):
    """(train arguments, words of the refusal) of one way an output can overlap an
    input; every input is under tmp/d."""
    d = tmp / 'd'
    d.mkdir()
    shutil.copy(ratings, d / 'a.tsv')
    shutil.copy(ratings, d / 'b.tsv')
    if name == 'glob':
        return ['--input', f'{d}/*.tsv', '--output', d], ['contains', '(matched by']
    if name == 'dotdot':
        (tmp / 'e').mkdir()
        return ['--input', d / 'a.tsv', '--output', f'{tmp}/e/../d'], ['contains']
    if name == 'trailing slash':
        return ['--input', d / 'a.tsv', '--output', f'{d}/'], ['contains']
    if name == 'symlinked input':
        (tmp / 'alias').symlink_to(d, target_is_directory=True)
        return ['--input', tmp / 'alias' / 'a.tsv', '--output', d], ['contains']
    if name == 'test_input':
        return ['--input', ratings, '--test_input', d / 'b.tsv', '--output', d], \
            ['contains --test_input']
    if name == 'previous_model':
        copy_model(model, d / 'm')
        return ['--input', ratings, '--previous_model', d / 'm', '--output', d], \
            ['contains --previous_model']
    raise ValueError(name)


@pytest.mark.parametrize('case', ['glob', 'dotdot', 'trailing slash', 'symlinked input',
                                  'test_input', 'previous_model'])
def test_an_output_overlapping_what_train_reads_is_refused(tmp_path, ratings, model, case):
    args, words = _overlap_case(case, tmp_path, ratings, model)
    before = tree(tmp_path)
    refused(cli('train', *args, '--overwrite', *SMALL), 'overlaps', *words)
    assert tree(tmp_path) == before


def test_retraining_a_model_in_place_is_still_allowed(tmp_path, model, ratings):
    """--previous_model OUT --output OUT --overwrite: the previous model is read
    whole before it is replaced (the one overlap that is not refused)."""
    out = copy_model(model, tmp_path / 'out')
    proc = cli('train', '--input', ratings, '--previous_model', out, '--output', out,
               '--overwrite', *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_id(out) != run_id(model)
    assert leftovers(tmp_path) == []


def test_an_output_that_is_a_file_or_lies_under_one(tmp_path, ratings):
    afile = tmp_path / 'afile'
    afile.write_text('not a folder')
    before = tree(tmp_path)
    refused(cli('train', '--input', ratings, '--output', afile, *SMALL),
            f'--output {afile} is a file')
    refused(cli('train', '--input', ratings, '--output', afile / 'model', *SMALL),
            'is a file where a folder should be')
    refused(cli('train', '--input', ratings, '--model_root', afile, *SMALL),
            '--model_root', 'is a file where a folder should be')
    assert tree(tmp_path) == before


def test_a_read_only_parent_is_refused_before_any_work(tmp_path, ratings):
    ro = tmp_path / 'ro'
    ro.mkdir()
    with read_only(ro):
        refused(cli('train', '--input', ratings, '--output', ro / 'model', *SMALL),
                'cannot create files in', str(ro))
        refused(cli('train', '--input', ratings, '--output', ro / 'a' / 'b', *SMALL),
                'cannot create files in')
    assert list(ro.iterdir()) == []


def test_keep_versions_without_a_model_root_is_refused(tmp_path, ratings):
    refused(cli('train', '--input', ratings, '--output', tmp_path / 'm',
                '--keep_versions', '2', *SMALL), '--keep_versions', 'ignored')
    assert list(tmp_path.iterdir()) == []


def test_a_failed_cleanup_after_a_successful_publish_is_a_warning(tmp_path, model,
                                                                   ratings):
    """The old copy cannot be deleted (its model/ folder is read-only): the publish
    has succeeded, so exit 0 with a warning; the next run reclaims the copy."""
    out = copy_model(model, tmp_path / 'out')
    with read_only(out / 'model'):
        proc = cli('train', '--input', ratings, '--output', out, '--overwrite', *SMALL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert 'could not delete the old copy' in proc.stderr
        new = load_model_files(str(out))                     # the new model, verified
        assert new.manifest['run_id'] != run_id(model)
        left = leftovers(tmp_path)
        assert [n for n in left if '.old-' in n] and [n for n in left if '.lease-' in n]
        # the read-only folder moved aside with the old copy: writable again there
        writable_again(next(tmp_path.glob('out.old-*')) / 'model')
    proc = cli('train', '--input', ratings, '--output', out, '--overwrite', *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert leftovers(tmp_path) == []
    load_model_files(str(out))


# ---- leftovers of killed runs ------------------------------------------------------

def test_a_killed_runs_leftovers_are_reclaimed_and_a_live_runs_are_not(tmp_path, model,
                                                                        ratings):
    out = copy_model(model, tmp_path / 'out')
    args = ['train', '--input', ratings, '--output', out, '--overwrite', *SMALL]
    # Killed once its staging folder holds the complete new model.
    killed = start(*args, plan=[{'at': 'staged', 'do': 'kill'}])
    wait_for(killed, 'publish: staged')
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    stale = leftovers(tmp_path)
    assert [n for n in stale if '.tmp-' in n] and [n for n in stale if '.lease-' in n]
    # Stopped (alive) with its staging complete: a run meanwhile must not touch it.
    go = tmp_path.parent / f'{tmp_path.name}-go'
    live = start(*args, plan=[{'at': 'staged', 'do': 'pause', 'until': str(go)}])
    try:
        wait_for(live, 'publish: staged')
        live.send_signal(signal.SIGSTOP)
        staging = [p for p in tmp_path.iterdir() if '.tmp-' in p.name and p.name not in stale]
        assert len(staging) == 1
        staged = tree(staging[0])
        proc = cli(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not set(stale) & set(leftovers(tmp_path))      # the killed run's: gone
        assert tree(staging[0]) == staged                      # the live run's: intact
    finally:
        live.send_signal(signal.SIGCONT)
        go.touch()
    code, log = finish(live)
    assert code == 0, log[-3000:]
    assert run_id(out) == json.loads(staged[SUCCESS])['run_id']   # the live run's model
    load_model_files(str(out))
    assert leftovers(tmp_path) == []


def test_a_killed_runs_leftovers_in_a_model_root_are_reclaimed(tmp_path, ratings):
    root = tmp_path / 'root'
    args = ['--input', ratings, '--model_root', root, *SMALL]
    proc = cli('train', *args)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def kill_at(step: str) -> list[str]:
        run = start('train', *args, plan=[{'at': step, 'do': 'kill'}])
        wait_for(run, f'publish: {step}')
        run.send_signal(signal.SIGKILL)
        run.wait()
        return [p.name for p in root.rglob('*')]

    names = kill_at('staged')                  # its staging folder, complete
    assert [n for n in names if '.tmp-' in n] and len(os.listdir(root / 'leases')) == 1
    names = kill_at('latest-temp-written')     # its temporary LATEST
    assert [n for n in names if n.startswith('.LATEST.tmp-')]
    assert not [n for n in names if '.tmp-' in n and not n.startswith('.LATEST')]
    assert len(os.listdir(root / 'leases')) == 1   # the first one's: reclaimed
    proc = cli('train', *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [p.name for p in root.rglob('*')]
    assert not [n for n in names if '.tmp-' in n], names
    assert os.listdir(root / 'leases') == []
    # the run killed after its version moved in left a complete version: kept
    versions = os.listdir(root / 'versions')
    assert len(versions) == 3
    for version in versions:
        load_model_files(str(root / 'versions' / version))


# ---- recommend -------------------------------------------------------------------

def test_recommend_refuses_foreign_files_overlaps_and_files(tmp_path, model, capsys):
    from pipeline.cli.recommend import main
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    users = tmp_path / 'out2' / 'users.txt'
    users.parent.mkdir()
    users.write_text('1\n2\n')
    afile = tmp_path / 'afile'
    afile.write_text('x')
    (tmp_path / 'alias').symlink_to(model, target_is_directory=True)
    before = tree(tmp_path)
    refused(cli('recommend', '--model', model, '--output', out, '--overwrite'),
            '1 file(s) this tool did not write: notes.txt')
    refused_here(main, ['--model', model, '--users', users, '--output', users.parent,
                        '--overwrite'], capsys, 'contains --users')
    refused_here(main, ['--model', model, '--output', afile], capsys, 'is a file')
    refused_here(main, ['--model', tmp_path / 'alias', '--output', model / 'recs'], capsys,
                 'lies inside --model')
    assert tree(tmp_path) == before
    assert tree(model) == tree(tmp_path / 'alias')


# ---- models with missing or forged files (§7) -------------------------------------

def _damage(model: pathlib.Path, dest: pathlib.Path, how: str) -> str:
    """A copy of the model with one file damaged; returns the file's relative path."""
    copy_model(model, dest)
    manifest = json.loads((dest / SUCCESS).read_text())
    if how == 'col.npy missing':
        (dest / 'model' / 'col.npy').unlink()
        return 'model/col.npy'
    if how == 'seen part missing':
        (dest / 'model' / 'seen' / 'part-00001.npz').unlink()
        return 'model/seen/part-00001.npz'
    if how == 'forged object array':
        buf = io.BytesIO()
        np.save(buf, np.array([{'not': 'numbers'}], dtype=object), allow_pickle=True)
        data = buf.getvalue()
        (dest / 'model' / 'col.npy').write_bytes(data)
        manifest['files']['model/col.npy'] = {'bytes': len(data),
                                              'sha256': hashlib.sha256(data).hexdigest()}
        (dest / SUCCESS).write_text(json.dumps(manifest))   # forged to match
        return 'model/col.npy'
    raise ValueError(how)


def _failed(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 1, f'exit {proc.returncode}:\n{proc.stderr[-3000:]}'
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    text = proc.stderr
    for word in words:
        assert word in text, f'{word!r} not in:\n{text[-2000:]}'


@pytest.mark.parametrize('how', ['col.npy missing', 'seen part missing',
                                 'forged object array'])
def test_recommend_names_the_missing_or_forged_file(tmp_path, model, how):
    bad = tmp_path / 'bad'
    rel = _damage(model, bad, how)
    word = 'is missing' if 'missing' in how else 'untrusted model'
    _failed(cli('recommend', '--model', bad, '--output', tmp_path / 'recs'),
            f'{bad}/{rel}', word)
    assert not (tmp_path / 'recs').exists() and leftovers(tmp_path) == []
    _failed(cli('recommend', '--model', bad, '--user', '1'), f'{bad}/{rel}', word)


@pytest.mark.parametrize('how', ['col.npy missing', 'seen part missing',
                                 'forged object array'])
def test_export_names_the_missing_or_forged_file(tmp_path, model, how, capsys):
    pytest.importorskip('tensorflow')
    from pipeline.cli.export import main
    bad = tmp_path / 'bad'
    rel = _damage(model, bad, how)
    word = 'is missing' if 'missing' in how else 'untrusted model'
    capsys.readouterr()
    code = main(['--model', str(bad), '--output', str(tmp_path / 'exp')])
    _failed(subprocess.CompletedProcess([], code, '', capsys.readouterr().err),
            f'{bad}/{rel}', word)
    assert not (tmp_path / 'exp').exists() and leftovers(tmp_path) == []


# ---- export ----------------------------------------------------------------------

def test_export_refusals_and_its_manifest(tmp_path, model, capsys):
    pytest.importorskip('tensorflow')
    from pipeline.cli.export import main
    afile = tmp_path / 'afile'
    afile.write_text('x')
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'notes.txt').write_text('mine')
    exp = tmp_path / 'exp'
    before = tree(tmp_path)
    refused(cli('export', '--model', model, '--output', afile), 'is a file')
    refused_here(main, ['--model', model, '--output', other], capsys, 'notes.txt',
                 'not TF Serving version folders')
    refused_here(main, ['--model', model, '--output', model], capsys, 'is --model',
                 'overlaps')
    refused_here(main, ['--model', model, '--output', model / 'exp'], capsys, 'lies inside')
    for version in ('0', '-1'):
        refused_here(main, ['--model', model, '--output', exp, '--version', version], capsys,
                     '--version must be 1 or more')
    assert tree(tmp_path) == before
    assert main(['--model', str(model), '--output', str(exp), '--version', '3']) == 0
    manifest = json.loads((exp / '3' / SUCCESS).read_text())
    assert manifest['kind'] == 'savedmodel' and 'saved_model.pb' in manifest['files']
    assert sorted(os.listdir(exp)) == ['3']                    # no staging, no lease
    refused_here(main, ['--model', model, '--output', exp, '--version', '3'], capsys,
                 'immutable')


# ---- tune ------------------------------------------------------------------------

TUNE = ['--trials', '1', '--parallel', '1', '--num_iters', '1', '--direct_running_mode',
        'in_memory']


def test_tune_refuses_a_model_folder_foreign_files_overlaps_and_files(tmp_path, model,
                                                                      ratings, capsys):
    from pipeline.cli.tune import main
    m = copy_model(model, tmp_path / 'm')
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'notes.txt').write_text('mine')
    d = tmp_path / 'd'
    d.mkdir()
    shutil.copy(ratings, d / 'a.tsv')
    afile = tmp_path / 'afile'
    afile.write_text('x')
    before = tree(tmp_path)
    refused(cli('tune', '--input', ratings, '--output', m, '--overwrite', *TUNE),
            'holds a published model, not tuning output')
    for argv, words in (
            (['--output', m / 'tuning'], ['lies inside', 'a published model']),
            (['--output', other, '--overwrite'], ['notes.txt']),
            (['--input', f'{d}/*.tsv', '--output', d, '--overwrite'], ['contains --input']),
            (['--output', afile], ['is a file'])):
        argv = argv if '--input' in argv else ['--input', ratings, *argv]
        refused_here(main, [*argv, *TUNE], capsys, *words)
    assert tree(tmp_path) == before


def test_tune_publishes_its_results_with_a_manifest(tmp_path, ratings):
    out = tmp_path / 't'
    for extra in ([], ['--overwrite']):
        proc = cli('tune', '--input', ratings, '--output', out, *extra, *TUNE)
        assert proc.returncode == 0, proc.stderr[-3000:]
        manifest = json.loads((out / SUCCESS).read_text())
        assert manifest['kind'] == 'tuning'
        assert sorted(manifest['files']) == ['best.json', 'trials.csv']
        assert sorted(os.listdir(out)) == [SUCCESS, 'best.json', 'trials.csv']
        assert leftovers(tmp_path) == []


# ---- gs:// -----------------------------------------------------------------------

@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
    from tests.gcs_support import gcs_emulator
    with gcs_emulator(tmp_path_factory.mktemp('gcs'), BUCKET) as emu:
        yield emu


def _put(path: str, data: bytes) -> None:
    with FileSystems.create(path) as f:
        f.write(data)


def _put_tree(src: pathlib.Path, dest: str) -> None:
    for path in sorted(p for p in src.rglob('*') if p.is_file()):
        _put(f'{dest}/{path.relative_to(src).as_posix()}', path.read_bytes())


def test_gcs_overlaps_foreign_files_and_objects(emulator, ratings, model):
    gs = f'gs://{BUCKET}'
    extra = emulator.env()
    _put(f'{gs}/d/data.tsv', ratings.read_bytes())
    _put(f'{gs}/afile', b'x')
    _put_tree(model, f'{gs}/m')
    _put(f'{gs}/m/notes.txt', b'mine')
    before = emulator.list_objects(BUCKET)
    for out, words in ((f'{gs}/d', ['contains --input']),
                       (f'{gs}/d/', ['contains --input']),
                       (f'{gs}/x/../d', ['contains --input'])):
        refused(cli('train', '--input', f'{gs}/d/data.tsv', '--output', out, '--overwrite',
                    *SMALL, extra_env=extra), 'overlaps', *words)
    refused(cli('train', '--input', f'{gs}/d/*.tsv', '--output', f'{gs}/d', '--overwrite',
                *SMALL, extra_env=extra), 'contains --input', '(matched by')
    refused(cli('train', '--input', ratings, '--output', f'{gs}/m', '--overwrite', *SMALL,
                extra_env=extra), '1 file(s) this tool did not write: notes.txt')
    refused(cli('train', '--input', ratings, '--output', f'{gs}/afile', *SMALL,
                extra_env=extra), 'is a file')
    refused(cli('recommend', '--model', f'{gs}/m', '--output', f'{gs}/m/recs',
                extra_env=extra), 'lies inside --model')
    assert emulator.list_objects(BUCKET) == before


def test_gcs_a_killed_overwrite_is_reclaimed_by_the_next(emulator, ratings, model):
    gs = f'gs://{BUCKET}/killed'
    extra = emulator.env()
    _put_tree(model, f'{gs}/out')
    args = ['train', '--input', ratings, '--output', f'{gs}/out', '--overwrite', *SMALL]
    run = start(*args, extra_env=extra, plan=[{'at': 'new-files-moved', 'do': 'kill'}])
    wait_for(run, 'publish: new-files-moved')     # new files in, no _SUCCESS yet
    run.send_signal(signal.SIGKILL)
    run.wait()
    names = emulator.list_objects(BUCKET, 'killed/')
    assert any('.tmp-' in n for n in names) and any('.lease-' in n for n in names)
    assert 'killed/out/_SUCCESS' not in names
    assert load_model_files(f'{gs}/out').manifest['run_id'] == run_id(model)  # the copy
    proc = cli(*args, extra_env=extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = emulator.list_objects(BUCKET, 'killed/')
    assert not [n for n in names if any(m in n for m in ('.tmp-', '.old-', '.lease-'))]
    assert load_model_files(f'{gs}/out').manifest['run_id'] != run_id(model)


def test_gcs_export_is_published_with_its_manifest(emulator, model, capsys):
    """export to gs://: the SavedModel is saved locally, copied into the staging
    prefix, and published with its _SUCCESS (no TensorFlow filesystem plugin)."""
    pytest.importorskip('tensorflow')
    from pipeline.cli.export import main
    base = f'gs://{BUCKET}/exp'
    assert main(['--model', str(model), '--output', base]) == 0
    names = emulator.list_objects(BUCKET, 'exp')
    manifest = json.loads(names and FileSystems.open(f'{base}/1/{SUCCESS}').read())
    assert manifest['kind'] == 'savedmodel'
    assert sorted(names) == sorted(['exp/1/' + f for f in manifest['files']] +
                                   [f'exp/1/{SUCCESS}'])
    refused_here(main, ['--model', model, '--output', base, '--version', '1'], capsys,
                 'immutable')
    assert main(['--model', str(model), '--output', base]) == 0     # the next version
    assert {n.split('/')[1] for n in emulator.list_objects(BUCKET, 'exp')} == {'1', '2'}

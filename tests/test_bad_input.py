"""Bad input, nothing lost: line accounting, clear errors, atomic and safe outputs."""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.io.parse import LineFormat, _parse_columnar, parse_lines, parse_range
from pipeline.store.model_files import read_model
from pipeline.store.publish import SUCCESS, OutputExists, UntrustedModel
from tests.conftest import ROOT
from tests.pipeline_support import load_metrics, run_pipeline
from wals_core.hashing import id_hashes, is_test

NASTY = ROOT / 'tests' / 'data' / 'nasty'
DELIMITERS = ['\t', ',', ';', '|', ' ']


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, '-m', 'pipeline.train', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


def model_bytes(out: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / 'model').glob('*.npy'))}


# --- Property tests on messy files -------------------------------------------------

good_line = st.tuples(st.integers(1, 40), st.integers(1, 30), st.integers(1, 5))
garbage = st.one_of(
    st.binary(min_size=1, max_size=30).filter(lambda b: b'\n' not in b),
    st.sampled_from([b'nonsense', b'1', b'1\x002', b'\xff\xfe', b'x\ty', b'1\t2\tNaN',
                     b'1\t2\tinf', b'1\t\t3', b'\t2\t3', b'1\t2\tabc', b'1\t2\t-inf']))
messy_lines = st.lists(st.one_of(good_line.map(lambda t: ('good', t)),
                                 garbage.map(lambda b: ('junk', b)),
                                 st.just(('blank', b''))), max_size=60)


def render(lines, delimiter: str, crlf: bool, bom: bool) -> tuple[bytes, list]:
    """File bytes, and the (user, item, rating) of the lines that must be kept."""
    eol = b'\r\n' if crlf else b'\n'
    out, kept = [], []
    for kind, value in lines:
        if kind == 'good':
            out.append(delimiter.join(map(str, value)).encode())
            kept.append(tuple(str(v) for v in value))
        elif kind == 'junk':
            out.append(value.replace(b'\t', delimiter.encode()).replace(b'\r', b''))
        else:
            out.append(b'')
    data = eol.join(out) + (eol if out else b'')
    return (b'\xef\xbb\xbf' + data if bom and out else data), kept


@settings(max_examples=300, deadline=None)
@given(messy_lines, st.sampled_from(DELIMITERS), st.booleans(), st.booleans())
def test_every_line_is_kept_skipped_or_bad(lines, delimiter, crlf, bom):
    data, kept = render(lines, delimiter, crlf, bom)
    chunk = parse_range(data, 'f', 0, LineFormat(delimiter))
    c = chunk.counts
    bad = sum(n for k, n in c.items() if k.startswith('bad:'))
    assert c['kept'] + c['blank'] + c['header'] + bad == c['lines_read'] == len(lines)
    assert len(chunk.bad) == bad
    got = list(zip(chunk.users.tolist(), chunk.items.tolist(),
                   [str(int(v)) if v == int(v) else str(v) for v in chunk.values.tolist()]))
    # Every good line is kept; junk that happens to be a valid rating line may be too.
    assert all(k in got for k in kept) and len(got) >= len(kept)
    for b in chunk.bad:
        assert b.reason and 0 <= b.index < len(lines)


def assert_same_chunk(a, b):
    assert a.users.tolist() == b.users.tolist() and a.items.tolist() == b.items.tolist()
    assert a.values.tobytes() == b.values.tobytes()
    assert a.counts == b.counts and a.bad == b.bad


clean_lines = st.lists(good_line.map(lambda t: ('good', t)), min_size=1, max_size=60)


def test_columnar_fast_path_agrees_with_the_line_parser():
    answered = []

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(messy_lines, clean_lines), st.sampled_from(DELIMITERS), st.booleans(),
           st.booleans(), st.booleans(), st.integers(0, 2))
    def check(lines, delimiter, crlf, bom, header, pad):
        data, _ = render(lines, delimiter, crlf, bom)
        if pad == 1:     # padded fields: " 1\t 2\t3 " must parse like "1\t2\t3"
            data = data.replace(delimiter.encode(), b' ' + delimiter.encode() + b' ')
        fmt = LineFormat(delimiter, has_header=header)
        fast = _parse_columnar(data, 'f', 0, fmt)
        if fast is not None:
            answered.append(len(lines))
            assert_same_chunk(fast, parse_lines(data, 'f', 0, fmt))

    check()
    # The comparison must have happened often, not only on the odd clean case.
    assert len(answered) >= 50, f'the fast path answered {len(answered)} of 300 cases'


def test_columnar_fast_path_takes_clean_ranges():
    data = b'\xef\xbb\xbfuser\titem\trating\tts\r\n1\t 10\t4.5\t0\r\n2\t10 \t3\textra\r\n'
    fmt = LineFormat('\t', has_header=True)
    fast = _parse_columnar(data, 'f', 0, fmt)
    assert fast is not None
    assert_same_chunk(fast, parse_lines(data, 'f', 0, fmt))
    assert fast.item_ids.tolist() == ['10'] and fast.values.tolist() == [4.5, 3.0]
    assert _parse_columnar(b'1\t2\t3\n\n4\t5\t6\n', 'f', 0, LineFormat('\t')) is None


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(good_line, min_size=30, max_size=80, unique_by=lambda t: t[:2]),
       st.lists(garbage, min_size=1, max_size=15), st.sampled_from(DELIMITERS),
       st.booleans(), st.booleans(), st.booleans(), st.randoms(use_true_random=False))
def test_model_from_messy_file_equals_model_from_its_good_lines(
        tmp_path_factory, good, junk, delimiter, crlf, bom, gz, rnd):
    tmp = tmp_path_factory.mktemp('messy')
    # Junk that happens to be a valid rating line (e.g. "1,2,3") or blank is not bad:
    # drop it, so that the kept lines are exactly the good ones and the rest is bad.
    junk = [j for j in junk if len(parse_lines(render([('junk', j)], delimiter, False, False)[0],
                                               'f', 0, LineFormat(delimiter)).bad) == 1]
    lines = [('good', g) for g in good] + [('junk', j) for j in junk]
    rnd.shuffle(lines)
    messy, kept = render(lines, delimiter, crlf, bom)
    clean, _ = render([('good', g) for g in good], '\t', False, False)
    suffix = '.gz' if gz else ''
    (tmp / f'messy.txt{suffix}').write_bytes(gzip.compress(messy) if gz else messy)
    (tmp / 'clean.txt').write_bytes(clean)
    args = ['--num_iters', '2', '--latent_factors', '3', '--max_bad_fraction', '1']
    m = run_pipeline(tmp / f'messy.txt{suffix}', tmp / 'm', '--delimiter', delimiter, *args)
    run_pipeline(tmp / 'clean.txt', tmp / 'c', *args)
    lines_report = m['lines']
    assert lines_report['kept'] + lines_report['bad'] + lines_report['skipped_blank'] \
        + lines_report['skipped_header'] == lines_report['lines_read'] == len(lines)
    assert lines_report['kept'] == len(kept) == len(good)
    assert lines_report['bad'] == len(junk)
    assert model_bytes(tmp / 'm') == model_bytes(tmp / 'c')


# --- Each kind of bad line, with its reason and line number -----------------------

def test_bad_lines_are_listed_with_file_line_and_reason(tmp_path):
    src = NASTY / 'every_bad_kind.tsv'
    metrics = run_pipeline(src, tmp_path / 'out', '--num_iters', '1', '--max_bad_fraction', '1')
    want = {2: 'not_utf8', 3: 'not_finite', 4: 'not_finite', 5: 'empty_id', 6: 'empty_id',
            7: 'too_few_fields', 8: 'not_a_number', 9: 'not_finite'}
    errors = [json.loads(l) for f in sorted((tmp_path / 'out' / 'errors').glob('*.jsonl'))
              for l in f.read_text().splitlines()]
    assert {e['line']: e['reason'] for e in errors} == want
    assert all(e['file'].endswith('every_bad_kind.tsv') for e in errors)
    lines = metrics['lines']
    assert lines['lines_read'] == 9 and lines['kept'] == 1 and lines['bad'] == 8
    assert lines['bad_by_reason'] == {'empty_id': 2, 'not_a_number': 1, 'not_finite': 3,
                                      'not_utf8': 1, 'too_few_fields': 1}
    assert 'every_bad_kind.tsv:2: not_utf8: ' in metrics['bad_line_examples'][0]


def test_line_numbers_are_exact_across_byte_ranges(tmp_path):
    from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
    from apache_beam.testing.util import assert_that, equal_to
    import apache_beam as beam
    from apache_beam.pvalue import AsSingleton
    from pipeline.io.read_summary import SummarizeReads, number_bad_lines
    from pipeline.io.read import ReadConfig, ReadRatings
    lines = [f'{n}\t{n % 9}\t{"bad" if n % 37 == 0 else 3}' for n in range(1, 1500)]
    (tmp_path / 'r.tsv').write_text('\n'.join(lines) + '\n')
    with BeamTestPipeline() as p:
        chunks = p | ReadRatings(ReadConfig(str(tmp_path / 'r.tsv'), '\t', False, 'ratings',
                                            split_bytes=211))
        summary = chunks | beam.CombineGlobally(SummarizeReads())
        numbered = (chunks | beam.FlatMap(number_bad_lines, AsSingleton(summary))
                    | beam.Map(lambda j: json.loads(j)['line']))
        assert_that(numbered, equal_to([n for n in range(1, 1500) if n % 37 == 0]))


def test_read_and_check_numbers_bad_lines_from_chunks_without_their_ratings(tmp_path):
    from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
    from apache_beam.testing.util import assert_that, equal_to
    import apache_beam as beam
    from pipeline.io.parse import LineFormat, parse_range
    from pipeline.io.read import ReadConfig
    from pipeline.io.read_summary import ReadAndCheck, bad_lines_only
    fmt = LineFormat('\t')
    clean = parse_range(b'1\t2\t3\n4\t5\t6\n', 'f', 0, fmt)
    mixed = parse_range(b'1\t2\t3\nx\t5\tbad\n', 'f', 100, fmt)
    assert list(bad_lines_only(clean)) == []
    [slim] = bad_lines_only(mixed)
    assert len(mixed.values) == 1 and len(slim.values) == 0 and len(slim.users) == 0
    assert (slim.bad, slim.offset, slim.path) == (mixed.bad, mixed.offset, mixed.path)
    # Through the transform: line numbers still count every range's lines.
    lines = [f'{n}\t{n % 9}\t{"bad" if n % 37 == 0 else 3}' for n in range(1, 1500)]
    (tmp_path / 'r.tsv').write_text('\n'.join(lines) + '\n')
    with BeamTestPipeline() as p:
        _, _, bad = p | ReadAndCheck(ReadConfig(str(tmp_path / 'r.tsv'), '\t', False,
                                                'ratings', split_bytes=211), 1.0)
        assert_that(bad | beam.Map(lambda j: json.loads(j)['line']),
                    equal_to([n for n in range(1, 1500) if n % 37 == 0]))


# --- The command line on a corpus of nasty files -----------------------------------

CORPUS = [
    # file, extra args, exit code, text in output, expected line counts (or None)
    ('crlf_bom.tsv', [], 0, 'Model written', {'kept': 5, 'bad': 0}),
    ('header_without_flag.tsv', [], 1, 'pass --headers', None),
    ('header_without_flag.tsv', ['--headers'], 0, 'Model written',
     {'kept': 5, 'skipped_header': 1}),
    ('every_bad_kind.tsv', [], 1, 'above --max_bad_fraction', None),
    ('every_bad_kind.tsv', ['--max_bad_fraction', '1'], 0, 'Model written',
     {'kept': 1, 'bad': 8}),
    ('empty.tsv', [], 1, 'no ratings found', None),
    ('only_blank.tsv', [], 1, 'no ratings found', None),
    ('wrong_delimiter.tsv', [], 1, 'too_few_fields 2', None),
    ('web_views_messy.csv', ['--data_type', 'web_views'], 1, 'negative_value 1', None),
    ('web_views_messy.csv', ['--data_type', 'web_views', '--max_bad_fraction', '1'], 0,
     'Model written', {'kept': 2, 'bad': 4, 'skipped_header': 1}),
    ('web_views_bad_header.csv', ['--data_type', 'web_views'], 1, 'missing contentId', None),
    ('single_rating.tsv', [], 0, 'Model written', {'kept': 1}),
    ('no_such_file.tsv', [], 2, 'no file matches', None),
]


@pytest.mark.parametrize('name, extra, code, text, lines', CORPUS,
                         ids=[f'{c[0]}{"+" if c[1] else ""}' for c in CORPUS])
def test_nasty_files_give_a_model_or_a_clear_error(tmp_path, name, extra, code, text, lines):
    out = tmp_path / 'out'
    proc = cli('--input', str(NASTY / name), '--output', str(out), '--num_iters', '2', *extra)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert text in proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr
    if code == 0:
        assert (out / SUCCESS).exists()
        metrics = json.loads((out / 'metrics.json').read_text())
        for key, value in lines.items():
            assert metrics['lines'][key] == value, (key, metrics['lines'])
        model = read_model(str(out))
        assert np.all(np.isfinite(model['row'])) and np.all(np.isfinite(model['col']))
    else:
        assert not out.exists() or not (out / SUCCESS).exists()
        assert not list(tmp_path.glob('out.tmp-*')), 'staging left behind'


# --- Edge cases of the split and numerics ------------------------------------------

def test_user_and_item_seen_only_in_test_get_zero_factors_and_count_as_cold(tmp_path):
    # Find a (user, item) pair the hashed split puts in test.
    cand = [(f'lonely{n}', f'rare{n}') for n in range(200)]
    test = is_test(id_hashes([u for u, _ in cand]), id_hashes([i for _, i in cand]), 0, 0.1)
    lonely_user, rare_item = cand[int(np.flatnonzero(test)[0])]
    rng = np.random.default_rng(0)
    rows = [f'u{u}\ti{i}\t{r}' for u, i, r in zip(rng.integers(0, 30, 600),
                                                   rng.integers(0, 20, 600),
                                                   rng.integers(1, 6, 600))]
    rows.append(f'{lonely_user}\t{rare_item}\t5')
    (tmp_path / 'r.tsv').write_text('\n'.join(rows) + '\n')
    metrics = run_pipeline(tmp_path / 'r.tsv', tmp_path / 'out', '--num_iters', '3')
    model = read_model(str(tmp_path / 'out'))
    u = model['user'].tolist().index(lonely_user)
    i = model['item'].tolist().index(rare_item)
    assert not model['row'][u].any() and not model['col'][i].any()
    assert metrics['test_cold_start_ratings'] >= 1
    assert metrics['users_without_training_ratings'] >= 1


def test_singular_systems_give_finite_factors(small_ratings, tmp_path):
    run_pipeline(small_ratings, tmp_path / 'out', '--num_iters', '2', '--latent_factors', '40',
                 '--regularization', '0', '--unobs_weight', '0')
    model = read_model(str(tmp_path / 'out'))
    assert np.all(np.isfinite(model['row'])) and np.all(np.isfinite(model['col']))


# --- The output folder contract ----------------------------------------------------

def test_existing_model_is_kept_unless_overwrite(small_ratings, tmp_path):
    out = tmp_path / 'out'
    assert cli('--input', str(small_ratings), '--output', str(out), '--num_iters', '1').returncode == 0
    before = model_bytes(out)
    proc = cli('--input', str(small_ratings), '--output', str(out), '--num_iters', '2')
    assert proc.returncode == 2 and '--overwrite' in proc.stderr
    assert model_bytes(out) == before
    proc = cli('--input', str(small_ratings), '--output', str(out), '--num_iters', '2',
               '--overwrite')
    assert proc.returncode == 0, proc.stderr
    assert model_bytes(out) != before
    assert json.loads((out / SUCCESS).read_text())['parameters']['num_iters'] == 2
    read_model(str(out))     # checksums match the new files


def test_failed_run_leaves_the_earlier_model_untouched(small_ratings, tmp_path):
    out = tmp_path / 'out'
    assert cli('--input', str(small_ratings), '--output', str(out), '--num_iters', '1').returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()}
    proc = cli('--input', str(NASTY / 'every_bad_kind.tsv'), '--output', str(out),
               '--overwrite')
    assert proc.returncode == 1 and 'Nothing was published' in proc.stderr
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()}
    assert after == before
    assert not list(tmp_path.glob('out.tmp-*'))


def test_killed_run_leaves_the_earlier_model_untouched(ml100k, small_ratings, tmp_path):
    out = tmp_path / 'out'
    assert cli('--input', str(small_ratings), '--output', str(out), '--num_iters', '1').returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, '-m', 'pipeline.train', '--input', str(ml100k),
                             '--output', str(out), '--overwrite', '--num_iters', '100'],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Killed once the pipeline has saved its rating blocks (a file the run itself
        # writes, in its staging folder): it is then past reading and into training.
        deadline = time.time() + 300
        while not list(tmp_path.glob('out.tmp-*/_work/blocks/**/block-*.npz')):
            assert proc.poll() is None, 'the run ended before it could be killed'
            assert time.time() < deadline, 'the run saved no rating blocks in 300 s'
            time.sleep(0.05)
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()}
    assert after == before
    read_model(str(out))


def test_reader_refuses_a_folder_without_success_or_with_changed_files(small_ratings, tmp_path):
    out = tmp_path / 'out'
    run_pipeline(small_ratings, out, '--num_iters', '1')
    read_model(str(out))
    row = out / 'model' / 'row.npy'
    data = bytearray(row.read_bytes())
    data[-1] ^= 1
    row.write_bytes(bytes(data))
    with pytest.raises(UntrustedModel, match='checksum'):
        read_model(str(out))
    (out / SUCCESS).unlink()
    with pytest.raises(UntrustedModel, match=SUCCESS):
        read_model(str(out))


def test_metrics_line_counts_add_up(ml100k, tmp_path):
    path = tmp_path / 'mixed.tsv'
    data = ml100k.read_text().splitlines()[:5000]
    data[10] = 'junk'
    data.insert(20, '')
    path.write_text('\n'.join(data) + '\n')
    metrics = run_pipeline(path, tmp_path / 'out', '--num_iters', '1')
    lines = metrics['lines']
    assert lines == {'lines_read': 5001, 'kept': 4999, 'bad': 1, 'skipped_blank': 1,
                     'skipped_header': 0, 'bad_by_reason': {'too_few_fields': 1}}
    assert load_metrics(tmp_path / 'out')['lines'] == lines


def test_a_model_published_during_the_run_is_not_replaced(small_ratings, tmp_path,
                                                          monkeypatch):
    """--overwrite is checked again at publish time: here another run's model lands
    in --output after this run has started (between its pipeline and its publish)."""
    import shutil
    from pipeline.training import run as training_run
    out = tmp_path / 'out'
    run_pipeline(small_ratings, tmp_path / 'other', '--num_iters', '1')
    real_remove_tree = training_run.remove_tree

    def remove_work_dir_while_another_run_publishes(path):
        real_remove_tree(path)
        shutil.copytree(tmp_path / 'other', out)

    monkeypatch.setattr(training_run, "remove_tree", remove_work_dir_while_another_run_publishes)
    with pytest.raises(OutputExists, match='already holds a published model'):
        run_pipeline(small_ratings, out, '--num_iters', '2')
    assert json.loads((out / SUCCESS).read_text())['parameters']['num_iters'] == 1
    assert model_bytes(out) == model_bytes(tmp_path / 'other')
    read_model(str(out))                       # the other run's model, intact
    assert not list(tmp_path.glob('out.tmp-*')), 'staging left behind'


@pytest.mark.parametrize('existing', ['nothing', 'empty folder', 'a file'])
def test_publish_without_overwrite_claims_the_folder_in_one_rename(tmp_path, existing):
    from pipeline.store.publish import publish
    out = tmp_path / 'out'
    if existing == 'empty folder':
        out.mkdir()
    elif existing == 'a file':
        out.mkdir()
        (out / 'notes.txt').write_text('someone else')
    staging = tmp_path / 'out.tmp-1'
    (staging / 'model').mkdir(parents=True)
    (staging / 'model' / 'row.npy').write_bytes(b'x')
    if existing == 'a file':
        with pytest.raises(OutputExists, match='already holds files'):
            publish(str(staging), str(out), {}, overwrite=False)
        assert sorted(p.name for p in out.iterdir()) == ['notes.txt']
        return
    manifest = publish(str(staging), str(out), {}, overwrite=False)
    assert list(manifest['files']) == ['model/row.npy']
    assert (out / SUCCESS).exists() and (out / 'model' / 'row.npy').read_bytes() == b'x'
    assert not staging.exists()


def test_an_overlong_id_is_a_bad_line_of_its_own(tmp_path):
    from tests.pipeline_support import load_model, run_pipeline
    rng = np.random.default_rng(5)
    lines = [f'u{rng.integers(0, 40)}\ti{rng.integers(0, 30)}\t{rng.integers(1, 6)}'
             for _ in range(2000)]
    lines[700] = 'x' * 10_000 + '\ti3\t4'          # a 10 kB garbage user ID
    path = tmp_path / 'r.tsv'
    path.write_text('\n'.join(lines) + '\n')
    metrics = run_pipeline(path, tmp_path / 'out', '--num_iters', '1')
    assert metrics['lines']['bad_by_reason'] == {'id_too_long': 1}
    model = load_model(tmp_path / 'out')
    assert model['user'].dtype.itemsize <= 4 * 3          # 'u39': not 10,000 wide
    bad = (tmp_path / 'out' / 'errors').glob('bad_lines*')
    assert any('"line": 701' in f.read_text() for f in bad)
    # a larger limit keeps it
    kept = run_pipeline(path, tmp_path / 'long', '--num_iters', '1', '--max_id_length', '20000')
    assert kept['lines']['bad'] == 0 and kept['lines']['kept'] == 2000

"""python -m pipeline.recommend on MovieLens 100k: batch output against a brute-force
numpy top-K, byte-identical reruns and runners, --users/--items, the three formats,
similar items, refused models, gs:// in and out, --overwrite, the single-user mode
and the Dataflow job."""
from __future__ import annotations

import io
import json
import pathlib
import shutil

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems

from pipeline.cli import recommend
from pipeline.store.model_files import load_model_files
from tests.pipeline_support import run_pipeline

K = 10


@pytest.fixture(scope='module')
def models(ml100k, tmp_path_factory) -> dict[str, pathlib.Path]:
    """Two small models trained by the real pipeline: wals (default objective, two
    row blocks) and explicit (biases, three row blocks)."""
    root = tmp_path_factory.mktemp('models')
    out = {}
    for mode, block in (('wals', '500'), ('explicit', '400')):
        out[mode] = root / mode
        run_pipeline(ml100k, out[mode], '--model', mode, '--num_iters', '2',
                     '--latent_factors', '6', '--block_size', block)
    return out


def run(*argv) -> int:
    return recommend.main([str(a) for a in argv])


def shards(out: pathlib.Path, pattern: str = 'recommendations-*') -> list[pathlib.Path]:
    return sorted(out.glob(pattern))


def read_jsonl(out: pathlib.Path, pattern: str = 'recommendations-*.jsonl') -> list[dict]:
    return [json.loads(line) for p in shards(out, pattern)
            for line in p.read_text().splitlines()]


def brute_force(files, include_seen=False):
    """float64 scores of every (user, item) with seen items at -inf (unless
    include_seen), in the pipeline's score convention."""
    s = files.row.astype(np.float64) @ files.col.astype(np.float64).T
    if files.params.model == 'explicit':
        s += files.global_mean + files.row_bias[:, None] + files.col_bias[None, :]
    if not include_seen:
        indptr, indices = files.load_seen()
        rows = np.repeat(np.arange(len(files.users)), np.diff(indptr))
        s[rows, indices] = -np.inf
    return s


def check_against(lines, files, scores, key='user', list_key='items', vocab=None):
    """Every line: K items, scores descending (ties by item row), each score the
    brute-force score, and no left-out item better than the K-th by more than float32
    rounding; the IDs equal the exact ranking wherever it has no near-tie."""
    vocab = files.users if vocab is None else vocab
    item_row = {v: j for j, v in enumerate(files.items.tolist())}
    query_row = {v: i for i, v in enumerate(vocab.tolist())}
    exact = 0
    for line in lines:
        i = query_row[line[key]]
        got = [item_row[e['item']] for e in line[list_key]]
        printed = np.array([e['score'] for e in line[list_key]], np.float64)
        assert len(got) == K == len(set(got))
        assert np.all(np.diff(printed) <= 0)
        for a in range(K - 1):
            if printed[a] == printed[a + 1]:
                assert got[a] < got[a + 1]
        row = scores[i]
        assert np.all(np.isfinite(row[got]))                      # none excluded
        np.testing.assert_allclose(printed, row[got], rtol=2e-6, atol=2e-6)
        rest = np.delete(row, got)
        assert rest.max() <= row[got].min() + 1e-5
        order = np.lexsort((np.arange(len(row)), -row))[:K + 1]
        gaps = np.diff(-row[order])
        if gaps.min() > 1e-4:
            assert got == order[:K].tolist()
            exact += 1
    return exact


def test_batch_recommendations_match_brute_force(models, tmp_path):
    files = load_model_files(str(models['wals']))
    out = tmp_path / 'recs'
    assert run('--model', models['wals'], '--output', out) == 0
    assert [p.name for p in shards(out)] == ['recommendations-00000-of-00002.jsonl',
                                             'recommendations-00001-of-00002.jsonl']
    lines = read_jsonl(out)
    assert [line['user'] for line in lines] == files.users.tolist()   # row order
    assert isinstance(lines[0]['user'], int) and isinstance(lines[0]['items'][0]['item'], int)
    exact = check_against(lines, files, brute_force(files))
    assert exact > 0.9 * len(lines)
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['counts'] == {'shards': 2, 'users': 943, 'short_lists': 0}
    manifest = json.loads((out / '_SUCCESS').read_text())
    assert manifest['kind'] == 'recommendations'
    assert set(manifest['files']) == {'metrics.json', *(p.name for p in shards(out))}
    assert manifest['inputs'][0]['model'] == str(models['wals'])
    assert not list(tmp_path.glob('recs.tmp-*'))                        # staging gone


def test_explicit_scores_are_predicted_ratings(models, tmp_path):
    files = load_model_files(str(models['explicit']))
    out = tmp_path / 'recs'
    assert run('--model', models['explicit'], '--output', out, '--top_k', K) == 0
    assert len(shards(out)) == 3
    lines = read_jsonl(out)
    assert len(lines) == 943
    check_against(lines, files, brute_force(files))
    # Predicted ratings (around the mean rating), not bare dot products.
    top = np.array([line['items'][0]['score'] for line in lines])
    assert 2.5 < np.median(top) < 7


def test_include_seen(models, tmp_path):
    files = load_model_files(str(models['wals']))
    out = tmp_path / 'recs'
    assert run('--model', models['wals'], '--output', out, '--include_seen') == 0
    lines = read_jsonl(out)
    check_against(lines, files, brute_force(files, include_seen=True))
    indptr, indices = files.load_seen()
    item_row = {v: j for j, v in enumerate(files.items.tolist())}
    seen_hits = sum(len(set(item_row[e['item']] for e in line['items'])
                        & set(indices[indptr[i]:indptr[i + 1]].tolist()))
                    for i, line in enumerate(lines))
    assert seen_hits > 0


def test_byte_identical_across_runs_and_runners(models, tmp_path):
    outs = []
    for name, beam in (('a', []), ('b', []),
                       ('mp', ['--direct_running_mode', 'multi_processing',
                               '--direct_num_workers', '2'])):
        outs.append(tmp_path / name)
        assert run('--model', models['explicit'], '--output', outs[-1], *beam) == 0
    ref = {p.name: p.read_bytes() for p in shards(outs[0])}
    assert len(ref) == 3
    for other in outs[1:]:
        assert {p.name: p.read_bytes() for p in shards(other)} == ref


def test_users_file_with_unknown_and_duplicate_ids(models, tmp_path):
    users = tmp_path / 'users.txt'
    users.write_text('900\n5\n  7 \nnobody\n5\n\n99999\n1\n')
    out = tmp_path / 'recs'
    assert run('--model', models['wals'], '--output', out, '--users', users) == 0
    lines = read_jsonl(out)
    assert [line['user'] for line in lines] == [1, 5, 7, 900]     # row order, once each
    full = tmp_path / 'full'
    assert run('--model', models['wals'], '--output', full) == 0
    by_user = {line['user']: line for line in read_jsonl(full)}
    assert all(line == by_user[line['user']] for line in lines)
    errors = sorted((out / 'errors').glob('unknown_users-*.txt'))
    assert [p.name for p in errors] == ['unknown_users-00000-of-00001.txt']
    assert errors[0].read_text() == 'nobody\n99999\n'
    counts = json.loads((out / 'metrics.json').read_text())['counts']
    assert counts == {'shards': 2, 'users': 4, 'short_lists': 0, 'requested_users': 7,
                      'unknown_users': 2, 'duplicate_users': 1}
    assert json.loads((out / '_SUCCESS').read_text())['counts'] == counts


def test_csv_and_parquet_hold_the_jsonl_content(models, tmp_path):
    pd = pytest.importorskip('pandas')
    args = ['--model', models['explicit'], '--top_k', 5]
    assert run(*args, '--output', tmp_path / 'j') == 0
    assert run(*args, '--output', tmp_path / 'c', '--format', 'csv') == 0
    assert run(*args, '--output', tmp_path / 'p', '--format', 'parquet') == 0
    long = pd.DataFrame([(line['user'], r + 1, e['item'], e['score'])
                         for line in read_jsonl(tmp_path / 'j')
                         for r, e in enumerate(line['items'])],
                        columns=['user', 'rank', 'item', 'score'])
    csv = pd.concat([pd.read_csv(p) for p in shards(tmp_path / 'c')], ignore_index=True)
    parquet = pd.concat([pd.read_parquet(p) for p in shards(tmp_path / 'p')],
                        ignore_index=True)
    assert len(shards(tmp_path / 'c')) == len(shards(tmp_path / 'p')) == 3
    assert list(parquet.columns) == list(csv.columns) == ['user', 'rank', 'item', 'score']
    assert str(parquet['score'].dtype) == 'float32' and str(parquet['rank'].dtype) == 'int32'
    for frame in (csv, parquet):
        assert frame[['user', 'rank', 'item']].astype(np.int64).equals(
            long[['user', 'rank', 'item']].astype(np.int64))
        # '%.9g' round-trips float32 exactly.
        assert np.array_equal(frame['score'].to_numpy(np.float32),
                              long['score'].to_numpy(np.float32))


def test_similar_items_match_brute_force_cosine(models, tmp_path):
    files = load_model_files(str(models['wals']))
    out = tmp_path / 'sim'
    assert run('--model', models['wals'], '--output', out, '--similar_items') == 0
    assert [p.name for p in out.glob('similar_items-*')] == [
        'similar_items-00000-of-00001.jsonl']
    lines = read_jsonl(out, 'similar_items-*.jsonl')
    assert len(lines) == len(files.items)
    v = files.col.astype(np.float64)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    unit = np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)   # zero stays zero
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)                 # never the item itself
    exact = check_against(lines, files, cos, key='item', list_key='similar',
                          vocab=files.items)
    assert exact > 0.5 * len(lines)
    # --items: a subset, unknown IDs listed.
    items = tmp_path / 'items.txt'
    items.write_text('50\nno-such-item\n1\n')
    sub = tmp_path / 'sub'
    assert run('--model', models['wals'], '--output', sub, '--similar_items',
               '--items', items) == 0
    picked = read_jsonl(sub, 'similar_items-*.jsonl')
    assert [line['item'] for line in picked] == [1, 50]
    assert picked == [line for line in lines if line['item'] in (1, 50)]
    assert (sub / 'errors' / 'unknown_items-00000-of-00001.txt').read_text() == \
        'no-such-item\n'


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def _flip_a_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_changed_model_is_refused_and_nothing_is_written(models, tmp_path, capsys):
    bad = _copy(models['wals'], tmp_path / 'bad')
    _flip_a_byte(bad / 'model' / 'col.npy')
    out = tmp_path / 'recs'
    assert run('--model', bad, '--output', out) == 1
    err = capsys.readouterr().err
    assert 'col.npy does not match its _SUCCESS checksum' in err
    assert not out.exists() and not list(tmp_path.glob('recs.tmp-*'))
    # A seen part is read by a worker: refused there, nothing published either.
    bad2 = _copy(models['wals'], tmp_path / 'bad2')
    _flip_a_byte(bad2 / 'model' / 'seen' / 'part-00001.npz')
    assert run('--model', bad2, '--output', out) == 1
    assert 'part-00001.npz does not match its _SUCCESS checksum' in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob('recs.tmp-*'))
    # No _SUCCESS: not a finished model.
    unfinished = _copy(models['wals'], tmp_path / 'unfinished')
    (unfinished / '_SUCCESS').unlink()
    assert run('--model', unfinished, '--output', out) == 1
    assert 'has no _SUCCESS' in capsys.readouterr().err
    assert not out.exists()


def test_overwrite_rules(models, tmp_path, capsys):
    out = tmp_path / 'recs'
    assert run('--model', models['wals'], '--output', out, '--top_k', 3) == 0
    first = read_jsonl(out)
    with pytest.raises(SystemExit) as e:
        run('--model', models['wals'], '--output', out, '--top_k', 4)
    assert e.value.code == 2 and 'pass --overwrite' in capsys.readouterr().err
    assert read_jsonl(out) == first
    assert run('--model', models['wals'], '--output', out, '--top_k', 4,
               '--overwrite') == 0
    assert all(len(line['items']) == 4 for line in read_jsonl(out))
    for where in (models['wals'], models['wals'] / 'recs', models['wals'].parent):
        with pytest.raises(SystemExit):
            run('--model', models['wals'], '--output', where, '--overwrite')
        assert 'overlap' in capsys.readouterr().err
    assert (models['wals'] / '_SUCCESS').exists()
    with pytest.raises(SystemExit):
        run('--model', models['wals'], '--output', tmp_path / 'x', '--num_iters', '3')
    assert 'unknown option(s): --num_iters' in capsys.readouterr().err


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
    from tests.gcs_support import gcs_emulator
    with gcs_emulator(tmp_path_factory.mktemp('gcs'), 'wals-recommend-test') as emu:
        yield emu


def test_gcs_model_in_and_recommendations_out(models, emulator, tmp_path):
    bucket = 'gs://wals-recommend-test'
    src = models['wals']
    for path in sorted(p for p in src.rglob('*') if p.is_file()):
        with FileSystems.create(f'{bucket}/model/{path.relative_to(src).as_posix()}') as f:
            f.write(path.read_bytes())
    local = tmp_path / 'local'
    assert run('--model', src, '--output', local, '--format', 'parquet') == 0
    assert run('--model', f'{bucket}/model', '--output', f'{bucket}/recs',
               '--format', 'parquet') == 0
    names = sorted(emulator.list_objects('wals-recommend-test', 'recs'))
    assert names == ['recs/_SUCCESS', 'recs/metrics.json',
                     'recs/recommendations-00000-of-00002.parquet',
                     'recs/recommendations-00001-of-00002.parquet']
    for p in shards(local):
        with FileSystems.open(f'{bucket}/recs/{p.name}') as f:
            assert f.read() == p.read_bytes()
    assert not [n for n in emulator.list_objects('wals-recommend-test')
                if '.tmp-' in n]


def test_single_user_mode_prints_the_batch_line(models, tmp_path, capsys):
    pytest.importorskip('pipeline.serving.recommender')
    out = tmp_path / 'recs'
    assert run('--model', models['explicit'], '--output', out) == 0
    by_user = {line['user']: line for line in read_jsonl(out)}
    capsys.readouterr()
    assert run('--model', models['explicit'], '--user', '196', '--json') == 0
    got = json.loads(capsys.readouterr().out)
    assert [e['item'] for e in got['items']] == [e['item'] for e in by_user[196]['items']]
    np.testing.assert_allclose([e['score'] for e in got['items']],
                               [e['score'] for e in by_user[196]['items']], rtol=1e-6)
    assert run('--model', models['explicit'], '--user', '196', '--top_k', 3) == 0
    text = capsys.readouterr().out.splitlines()
    assert [int(t.split('\t')[0]) for t in text] == \
        [e['item'] for e in by_user[196]['items'][:3]]
    ratings = tmp_path / 'me.tsv'
    ratings.write_text('50\t5\n181,4\n1\t1\n')
    assert run('--model', models['explicit'], '--new_user_ratings', ratings, '--json') == 0
    new = json.loads(capsys.readouterr().out)
    assert len(new['items']) == 10 and not {50, 181, 1} & {e['item'] for e in new['items']}
    with pytest.raises(SystemExit):
        run('--model', models['explicit'], '--user', 'nobody')
    assert 'not in the model' in capsys.readouterr().err


# ---- Dataflow: ./run_dataflow.sh recommend, built offline -------------------------

def test_run_dataflow_sh_launches_recommend(tmp_path):
    import subprocess
    from tests.conftest import ROOT
    from tests.test_dataflow_job import _loopback_only_env
    proc = subprocess.run([str(ROOT / 'run_dataflow.sh'), 'recommend', '--help'], cwd=tmp_path,
                          env=_loopback_only_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith('usage: ./run_dataflow.sh recommend')
    for flag in ('--model', '--similar_items', '--project', '--bucket', '--dry_run'):
        assert flag in proc.stdout


def test_dataflow_dry_run_reads_nothing(tmp_path, monkeypatch, capsys):
    """The dry run builds the job without reading the model (no server listens)."""
    from pipeline.cli import dataflow
    from tests.conftest import ROOT
    from tests.test_dataflow_job import BASE, BUCKET, _loopback_only_env
    for key, value in _loopback_only_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert dataflow.launch(['recommend', *BASE, '--dry_run', '--model',
                            f'gs://{BUCKET}/models/m1', '--format', 'parquet',
                            '--top_k', '20']) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index('\n{') + 1:])
    job = summary['job_name']
    assert job.startswith('wals-recommend-') and 'nothing was submitted' in out
    assert summary['output'] == f'gs://{BUCKET}/recommendations/{job}'
    assert (summary['format'], summary['top_k']) == ('parquet', 20)
    for expected in (f'--temp_location=gs://{BUCKET}/tmp', '--runner=DataflowRunner',
                     f'--staging_location=gs://{BUCKET}/staging',
                     f'--setup_file={ROOT / "setup.py"}', f'--job_name={job}'):
        assert expected in summary['beam_args']


@pytest.mark.parametrize('argv, message', [
    (['--model', 'local/model'], '--model must be a gs:// path'),
    (['--model', 'gs://b/m', '--output', 'out'], '--output must be a gs:// path'),
    (['--model', 'gs://b/m', '--runner', 'DirectRunner'], 'runs on Dataflow'),
    (['--model', 'gs://b/m', '--num_iters', '3'], 'unknown option'),
])
def test_dataflow_launcher_refuses_bad_command_lines(argv, message, capsys):
    from pipeline.cli import dataflow
    from tests.test_dataflow_job import BASE
    with pytest.raises(SystemExit):
        dataflow.launch(['recommend', *BASE, '--dry_run', *argv])
    assert message in capsys.readouterr().err


def test_dataflow_template_job_description(models, emulator, tmp_path, capsys):
    from pipeline.cli import dataflow
    from tests.conftest import ROOT
    from tests.gcs_support import PROJECT
    from tests.test_dataflow_job import REGION, _read, _staged_pipeline
    import tarfile
    bucket = 'gs://wals-recommend-test'
    path = tmp_path / 'job.json'
    assert dataflow.launch(['recommend', '--project', PROJECT, '--region', REGION,
                            '--bucket', bucket, '--model', f'{bucket}/models/m',
                            '--job_name', 'wals-recommend-template',
                            '--template_location', str(path)]) == 0
    capsys.readouterr()
    job = json.loads(path.read_text())
    assert job['name'] == 'wals-recommend-template'
    env = job['environment']
    pool = env['workerPools'][0]
    assert pool['machineType'] == dataflow.DEFAULT_MACHINE_TYPE
    assert pool['autoscalingSettings']['maxNumWorkers'] == dataflow.MAX_WORKERS_UNKNOWN_INPUT
    packages = {p['name']: p['location'] for p in pool['packages']}
    staged = 'gs://' + packages['workflow.tar.gz'].split('storage.googleapis.com/', 1)[1]
    with tarfile.open(fileobj=io.BytesIO(_read(staged))) as tar:
        names = {m.name.split('/', 1)[1] for m in tar.getmembers() if '/' in m.name}
    for module in ('pipeline/cli/recommend.py', 'pipeline/serving/batch.py',
                   'pipeline/store/model_files.py', 'wals_core/topk.py'):
        assert module in names
    assert env['sdkPipelineOptions']['options']['setup_file'] == str(ROOT / 'setup.py')
    _, pipeline = _staged_pipeline(job)
    pardos = sorted(t.unique_name for t in pipeline.components.transforms.values()
                    if t.spec.urn == 'beam:transform:pardo:v1')
    assert 'Recommend/Write' in pardos and 'Recommend/Shards' in pardos
    assert any(t.unique_name == 'Recommend/Spread'
               for t in pipeline.components.transforms.values())


def test_string_ids_survive_every_format(tmp_path):
    """IDs that are not integers stay strings, quoted as JSON and CSV require."""
    pd = pytest.importorskip('pandas')
    from tests.conftest import write_ratings
    rng = np.random.default_rng(3)
    pairs = rng.choice(40 * 30, size=500, replace=False)
    users = [f'u,{p // 30}' for p in pairs]              # a comma: quoted in CSV
    items = [f'i"{p % 30}' if p % 2 else f'é{p % 30}' for p in pairs]
    data = write_ratings(tmp_path / 'r.tsv', users, items, rng.integers(1, 6, 500))
    model = tmp_path / 'model'
    run_pipeline(data, model, '--num_iters', '1', '--latent_factors', '3')
    files = load_model_files(str(model))
    assert files.users.dtype.kind == 'U'
    for fmt in ('jsonl', 'csv', 'parquet'):
        assert run('--model', model, '--output', tmp_path / fmt, '--format', fmt,
                   '--top_k', 4) == 0
    lines = read_jsonl(tmp_path / 'jsonl')
    assert [line['user'] for line in lines] == files.users.tolist()
    assert {e['item'] for line in lines for e in line['items']} <= set(files.items.tolist())
    long = [(line['user'], e['item']) for line in lines for e in line['items']]
    for fmt, reader in (('csv', lambda p: pd.read_csv(p, dtype={'user': str, 'item': str},
                                                      keep_default_na=False)),
                        ('parquet', pd.read_parquet)):
        frame = pd.concat([reader(p) for p in shards(tmp_path / fmt)])
        assert list(zip(frame['user'], frame['item'])) == long

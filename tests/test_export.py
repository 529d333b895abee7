"""python -m pipeline.export: the SavedModel loads with tf.saved_model.load and its
signatures answer as the numpy API (pipeline.serving.recommender) does, for 20 users and
20 items of models trained by the pipeline; unknown IDs, padding, k limits, ties;
and training never imports TensorFlow.

TensorFlow comes with the `export` extra, which run_tests.sh installs: in CI a
missing TensorFlow is a failure, not a skip."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.pipeline_support import run_pipeline
from tests.test_recommender import ARGS, _handmade, _string_id_ratings

if os.environ.get('CI'):
    import tensorflow as tf
else:
    tf = pytest.importorskip('tensorflow')

from pipeline.cli.export import main  # noqa: E402 (needs TF)
from pipeline.serving.export import ServingModule, export  # noqa: E402
from pipeline.serving.recommender import Recommender  # noqa: E402
from pipeline.store.publish import OutputExists  # noqa: E402

K = 10


def test_training_never_imports_tensorflow():
    code = ('import sys, pipeline.cli.train, pipeline.training.graph, pipeline.serving.recommender\n'
            'bad = sorted(m for m in sys.modules if m.split(".")[0] in '
            '("tensorflow", "keras"))\n'
            'assert not bad, bad\n')
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope='module', params=['wals', 'explicit', 'implicit'])
def exported(request, tmp_path_factory):
    """(Recommender, loaded SavedModel, its path) of a model trained by the pipeline
    and exported by the command line."""
    mode = request.param
    base = tmp_path_factory.mktemp(f'export-{mode}')
    if mode == 'implicit':
        data = _string_id_ratings(base / 'ratings.tsv')
    else:
        data = request.getfixturevalue('ml100k')
    run_pipeline(data, base / 'out', *ARGS[mode])
    assert main(['--model', str(base / 'out'), '--output', str(base / 'export'),
                 '--top_k_max', '50']) == 0
    path = base / 'export' / '1'
    assert (path / 'saved_model.pb').exists()
    return Recommender.load(str(base / 'out')), tf.saved_model.load(str(path)), path


def _call(model, name: str, ids, k: int) -> dict:
    out = model.signatures[name](**{('user_ids' if name != 'similar_items' else 'item_ids'):
                                    tf.constant([str(i) for i in ids], tf.string),
                                    'k': tf.constant(k, tf.int32)})
    return {key: value.numpy() for key, value in out.items()}


def _assert_same(tf_ids, tf_scores, want: list):
    """A SavedModel row against the numpy API's [(item_id, score)]: scores within
    float32 tolerance, item IDs equal except where the numpy scores tie within
    1e-6 (relative) of a neighbour."""
    ids = [x.decode() for x in tf_ids]
    w_ids = [str(i) for i, _ in want]
    w_scores = np.array([s for _, s in want], np.float64)
    assert len(ids) == len(w_ids)
    np.testing.assert_allclose(tf_scores, w_scores, rtol=1e-5, atol=1e-6)
    tol = 1e-6 * np.maximum(1.0, np.abs(w_scores))
    gaps = np.abs(np.diff(w_scores))
    tied = np.zeros(len(w_ids), bool)
    tied[:-1] |= gaps <= tol[:-1]
    tied[1:] |= gaps <= tol[1:]
    for p in np.flatnonzero(~tied):
        assert ids[p] == w_ids[p], (p, ids, w_ids)


def test_signatures_follow_tf_serving_conventions(exported):
    _, model, path = exported
    assert set(model.signatures) == {'serving_default', 'recommend', 'similar_items'}
    for name, id_input in (('recommend', 'user_ids'), ('similar_items', 'item_ids')):
        f = model.signatures[name]
        args, kwargs = f.structured_input_signature
        assert not args
        assert kwargs[id_input].dtype == tf.string and kwargs[id_input].shape.as_list() == [None]
        assert kwargs['k'].dtype == tf.int32 and kwargs['k'].shape.rank == 0
        outs = f.structured_outputs
        assert outs['item_ids'].dtype == tf.string and outs['scores'].dtype == tf.float32
    # the vocabularies travel with the model (the export's temporary copies are gone)
    assert (path / 'assets' / 'users.txt').exists() and (path / 'assets' / 'items.txt').exists()


def test_recommend_answers_as_the_numpy_api(exported):
    rec, model, _ = exported
    rows = np.random.default_rng(3).choice(len(rec.users), size=20, replace=False)
    users = [rec.user_id(i) for i in rows]
    got = _call(model, 'recommend', users, K)
    default = _call(model, 'serving_default', users, K)
    assert got['item_ids'].shape == got['scores'].shape == (20, K)
    assert got['known'].all()
    for b, user in enumerate(users):
        _assert_same(got['item_ids'][b], got['scores'][b], rec.recommend(user, K))
        seen = {str(rec.item_id(j)) for j in rec.seen(user)}
        assert not seen & {x.decode() for x in got['item_ids'][b]}
    np.testing.assert_array_equal(default['item_ids'], got['item_ids'])
    np.testing.assert_array_equal(default['scores'], got['scores'])


def test_similar_items_answer_as_the_numpy_api(exported):
    rec, model, _ = exported
    rows = np.random.default_rng(4).choice(len(rec.items), size=20, replace=False)
    items = [rec.item_id(j) for j in rows]
    got = _call(model, 'similar_items', items, K)
    assert got['known'].all()
    for b, item in enumerate(items):
        _assert_same(got['item_ids'][b], got['scores'][b], rec.similar_items(item, K))


def test_unknown_ids_and_k_limits(exported):
    rec, model, _ = exported
    known = rec.user_id(0)
    got = _call(model, 'recommend', ['no-such-user', known], 5)
    assert got['known'].tolist() == [False, True]
    assert got['item_ids'][0].tolist() == [b''] * 5
    assert np.all(np.isneginf(got['scores'][0]))
    # a row does not depend on the other rows of its batch, to the bit
    alone = _call(model, 'recommend', [known], 5)
    many = _call(model, 'recommend', [rec.user_id(i) for i in range(40)], 5)
    for other in (got['scores'][1], many['scores'][0]):
        np.testing.assert_array_equal(alone['scores'][0], other)
    np.testing.assert_array_equal(alone['item_ids'][0], many['item_ids'][0])
    assert _call(model, 'similar_items', ['no-such-item'], 3)['known'].tolist() == [False]
    assert _call(model, 'recommend', [known], 0)['item_ids'].shape == (1, 0)
    assert _call(model, 'recommend', [], 4)['item_ids'].shape == (0, 4)
    assert _call(model, 'recommend', [known], 50)['item_ids'].shape == (1, 50)
    with pytest.raises(tf.errors.InvalidArgumentError, match='top_k_max'):
        _call(model, 'recommend', [known], 51)


def test_ties_padding_and_seen_items_on_a_handmade_model(tmp_path):
    col = np.array([[1, 0], [2, 0], [1, 0], [2, 0], [0, 1], [2, 0]], np.float64)
    rec = _handmade(col, np.array([[1, 0], [1, 0]]), [[3], []])
    module = ServingModule(rec, 10, str(tmp_path))
    tf.saved_model.save(module, str(tmp_path / 'm'), signatures={
        'recommend': module.recommend.get_concrete_function(),
        'similar_items': module.similar_items.get_concrete_function()})
    model = tf.saved_model.load(str(tmp_path / 'm'))
    got = _call(model, 'recommend', [0, 10], 7)
    assert got['item_ids'].tolist() == [
        [b'101', b'105', b'100', b'102', b'104', b'', b''],
        [b'101', b'103', b'105', b'100', b'102', b'104', b'']]
    np.testing.assert_array_equal(got['scores'][0], [2, 2, 1, 1, 0, -np.inf, -np.inf])
    for b, user in enumerate([0, 10]):
        want = rec.recommend(user, 7)
        n = len(want)
        assert [x.decode() for x in got['item_ids'][b][:n]] == [str(i) for i, _ in want]
    sim = _call(model, 'similar_items', [100], 3)
    assert sim['item_ids'].tolist() == [[b'101', b'102', b'103']]


def test_export_versions_and_refusals(exported, tmp_path):
    rec, _, path = exported
    if rec.params.model != 'wals':
        pytest.skip('the export command is the same for every mode')
    model_dir = rec.files.path
    out = tmp_path / 'exp'
    assert export(model_dir, str(out), 5) == f'{out}/1'
    assert export(model_dir, str(out), 5) == f'{out}/2'      # the next version
    with pytest.raises(OutputExists, match='immutable'):     # before any work
        export(model_dir, str(out), 5, version=1)
    assert sorted(os.listdir(out)) == ['1', '2']              # no staging left behind
    assert json.loads((out / '1' / '_SUCCESS').read_text())['kind'] == 'savedmodel'
    assert main(['--model', str(tmp_path / 'missing'), '--output', str(out)]) == 1

"""A published model as a TensorFlow SavedModel for
serving (TF Serving, or tf.saved_model.load in any TensorFlow 2 program).

    python -m pipeline.export --model output --output export [--top_k_max 100]

writes export/<version>/ (TF Serving's layout: it serves the highest numeric
version under its --model_base_path; the version is the next integer after the
ones already there, or --version). The SavedModel is staged beside it
(export/<version>.tmp-<run id>, a name TF Serving ignores) and published as every
output of this tool (pipeline/store/output_guard.py): a _SUCCESS manifest inside
the version folder, then one rename into place, so a server watching the folder
never sees half a model. A version folder is never replaced (TF Serving's versions
are immutable); an --output holding anything but version folders, a file, or a
folder overlapping the model is refused before any work.

Signatures (signature_def, string IDs as in the ratings file):
  recommend (also serving_default):
      user_ids string [batch], k int32 []  ->  item_ids string [batch, k],
      scores float32 [batch, k], known bool [batch]
  similar_items:
      item_ids string [batch], k int32 []  ->  item_ids string [batch, k],
      scores float32 [batch, k] (cosine), known bool [batch]
Scores and order are pipeline.serving.recommender's: u·v (wals, implicit) or the predicted
rating μ + b_u + c_j + u·v (explicit); ties by the smaller item row number (TF's
top_k keeps the lower index first, as wals_core.topk does); a known user's seen
items are never returned. An unknown ID (or a row with fewer than k items left)
gets item ID '' and score -inf in the positions it cannot fill, and known = false.
k must be in [0, --top_k_max]; a larger k is an INVALID_ARGUMENT error.

Contents: factors, biases and the seen-item lists are tf.Variables (the checkpoint
under variables/), the ID vocabularies are text assets (assets/users.txt,
assets/items.txt) read into hash tables when the model loads; the graph itself
stays small whatever the model's size.

TensorFlow is only imported here (the `export` extra): training never needs it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from pipeline.options import ConfigError
from pipeline.serving.recommender import Recommender
from pipeline.store.model_root import hold_model, release_holds
from pipeline.store.output_guard import LEFTOVER_RE, OutputGuard, family, output_kind
from pipeline.store.publish import (SUCCESS, OutputRefused, local_path, discard, new_run_id,
                                    our_manifest, read_manifest_bytes)

log = logging.getLogger(__name__)

DEFAULT_TOP_K_MAX = 100


def _id_strings(ids: np.ndarray) -> list[str]:
    """The IDs as the ratings file spelled them (int64 vocabularies are canonical)."""
    return [str(x) for x in ids.tolist()]


def _write_vocabulary(path: str, ids: np.ndarray) -> None:
    """One ID per line, line number = row number (the lookup table's asset)."""
    text = _id_strings(ids)
    bad = [t for t in text if '\n' in t or '\r' in t]
    if bad:
        raise ValueError(f'IDs with line breaks cannot be exported: {bad[:3]!r}')
    with open(path, 'w', encoding='utf-8', newline='\n') as f:
        f.write(''.join(t + '\n' for t in text))


def _table(path: str) -> tf.lookup.StaticHashTable:
    init = tf.lookup.TextFileInitializer(
        path, key_dtype=tf.string, key_index=tf.lookup.TextFileIndex.WHOLE_LINE,
        value_dtype=tf.int64, value_index=tf.lookup.TextFileIndex.LINE_NUMBER)
    return tf.lookup.StaticHashTable(init, default_value=-1)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalized rows as wals_core.topk.similar_items makes them (float64, then
    float32; a zero row stays zero)."""
    x = np.asarray(x, np.float64)
    norms = np.sqrt(np.einsum('ij,ij->i', x, x))[:, None]
    return np.divide(x, norms, out=np.zeros_like(x), where=norms != 0).astype(np.float32)


# Rows per matmul: every product has this shape, so a row's float32 scores do not
# depend on the rest of its request batch (a 1-row product takes a different kernel
# and rounds differently), as wals_core.topk pads its batches.
_BATCH_ROWS = 32


def _scores(queries, items):
    """queries (b × d) · items (n × d)ᵀ in float32, in fixed-shape chunks of rows."""
    b = tf.shape(queries)[0]
    padded = tf.pad(queries, [[0, (-b) % _BATCH_ROWS], [0, 0]])
    chunks = tf.reshape(padded, [-1, _BATCH_ROWS, tf.shape(queries)[1]])
    out = tf.matmul(chunks, items, transpose_b=True)        # chunks × rows × n
    return tf.reshape(out, [-1, tf.shape(items)[0]])[:b]


class ServingModule(tf.Module):
    """The exported model: variables, lookup tables and the two serving functions."""

    def __init__(self, rec: Recommender, top_k_max: int, asset_dir: str):
        super().__init__(name='wals')
        users_txt = os.path.join(asset_dir, 'users.txt')
        items_txt = os.path.join(asset_dir, 'items.txt')
        _write_vocabulary(users_txt, rec.users)
        _write_vocabulary(items_txt, rec.items)
        self.user_table = _table(users_txt)
        self.item_table = _table(items_txt)
        n_items = len(rec.items)
        shift = np.zeros(len(rec.users), np.float64)
        offsets = np.zeros(n_items, np.float32)
        if rec.explicit:
            shift = rec.global_mean + rec.row_bias.astype(np.float64)
            offsets = rec.col_bias.astype(np.float32)

        def var(value, name, dtype=None):
            return tf.Variable(value, trainable=False, name=name, dtype=dtype)

        self.user_factors = var(rec.row, 'user_factors')
        self.item_factors = var(rec.col, 'item_factors')
        self.item_offsets = var(offsets, 'item_offsets')          # c_j (explicit)
        self.user_shift = var(shift.astype(np.float32), 'user_shift')   # μ + b_u
        self.item_unit = var(_unit_rows(rec.col), 'item_unit')
        self.seen_splits = var(rec.seen_indptr.astype(np.int64), 'seen_row_splits')
        self.seen_items = var(rec.seen_indices.astype(np.int32), 'seen_items')
        self.item_ids = var(np.array(_id_strings(rec.items), dtype=object), 'item_ids',
                            tf.string)
        self.top_k_max = int(top_k_max)
        self.n_items = n_items

        k_spec = tf.TensorSpec([], tf.int32, name='k')

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='user_ids'),
                                      k_spec])
        def recommend(user_ids, k):
            rows = self.user_table.lookup(user_ids)
            known = rows >= 0
            safe = tf.maximum(rows, 0)
            scores = _scores(tf.gather(self.user_factors, safe), self.item_factors) \
                + self.item_offsets[None, :]
            seen = tf.RaggedTensor.from_row_splits(self.seen_items, self.seen_splits,
                                                   validate=False)
            mine = tf.gather(seen, safe)
            where = tf.stack([mine.value_rowids(), tf.cast(mine.flat_values, tf.int64)], 1)
            scores = tf.tensor_scatter_nd_update(
                scores, where, tf.fill(tf.shape(where)[:1], -np.inf))
            return self._top(scores, k, known, tf.gather(self.user_shift, safe))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='item_ids'),
                                      k_spec])
        def similar_items(item_ids, k):
            rows = self.item_table.lookup(item_ids)
            known = rows >= 0
            safe = tf.maximum(rows, 0)
            scores = _scores(tf.gather(self.item_unit, safe), self.item_unit)
            itself = tf.stack([tf.range(tf.size(safe, out_type=tf.int64)), safe], 1)
            scores = tf.tensor_scatter_nd_update(
                scores, itself, tf.fill(tf.shape(safe), -np.inf))
            return self._top(scores, k, known, tf.zeros(tf.shape(safe), tf.float32))

        self.recommend = recommend
        self.similar_items = similar_items

    def _top(self, scores, k, known, shift):
        """Top-k of every row (NaN as -inf), padded to k, unknown rows emptied."""
        tf.debugging.assert_greater_equal(k, 0, message='k must be >= 0')
        tf.debugging.assert_less_equal(k, self.top_k_max,
                                       message=f'k must be <= {self.top_k_max} (--top_k_max)')
        neg_inf = tf.constant(-np.inf, tf.float32)
        scores = tf.where(tf.math.is_nan(scores), neg_inf, scores)
        scores = tf.where(known[:, None], scores, neg_inf)
        kk = tf.minimum(k, self.n_items)
        best, index = tf.math.top_k(scores, k=kk, sorted=True)
        pad = [[0, 0], [0, k - kk]]
        best = tf.pad(best, pad, constant_values=-np.inf)
        index = tf.pad(index, pad)
        empty = tf.math.is_inf(best) & (best < 0)
        ids = tf.where(empty, tf.constant('', tf.string), tf.gather(self.item_ids, index))
        best = tf.where(empty, neg_inf, best + shift[:, None])
        return {'item_ids': ids, 'scores': best, 'known': known}


def _entries(base: str) -> dict[str, bool]:
    """{name: is a folder} of what base holds (object stores: the first component
    of every object name under it)."""
    local = local_path(base)
    if local is not None:
        if not os.path.isdir(local):
            return {}
        return {n: os.path.isdir(os.path.join(local, n)) for n in os.listdir(local)}
    out: dict[str, bool] = {}
    for pattern in (f'{base}/*', f'{base}/*/**'):
        try:
            metas = FileSystems.match([pattern])[0].metadata_list
        except Exception:   # noqa: BLE001 - nothing there
            continue
        for m in metas:
            name, slash, _ = m.path[len(base) + 1:].partition('/')
            out[name] = out.get(name, False) or bool(slash)
    return out


def next_version(output: str) -> int:
    """1 + the largest numeric version folder under output (1 if none)."""
    versions = [int(n) for n, folder in _entries(output.rstrip('/')).items()
                if folder and n.isdigit()]
    return max(versions, default=0) + 1


def check_base(base: str) -> None:
    """OutputRefused unless the export base holds only TF Serving version folders
    (numeric names holding a SavedModel) and this tool's leftovers: it is never a
    published output itself, nor a folder of other files."""
    manifest = our_manifest(base)
    if manifest is not None:
        raise OutputRefused(f'--output {base} holds {family(output_kind(manifest))} (it '
                            'has a _SUCCESS manifest): exports go to a folder of their own')
    foreign = []
    for name, folder in sorted(_entries(base).items()):
        if LEFTOVER_RE.match(name):
            continue
        if folder and name.isdigit() and (
                FileSystems.exists(f'{base}/{name}/saved_model.pb')
                or FileSystems.exists(f'{base}/{name}/{SUCCESS}')):
            continue
        foreign.append(name + ('/' if folder else ''))
    if foreign:
        shown = ', '.join(foreign[:5]) + (f', ... ({len(foreign)} in all)'
                                          if len(foreign) > 5 else '')
        raise OutputRefused(f'--output {base} holds {len(foreign)} thing(s) that are not '
                            f'TF Serving version folders of this tool: {shown}. Export to '
                            'a folder of its own (TF Serving\'s --model_base_path)')


def export(model: str, output: str, top_k_max: int = DEFAULT_TOP_K_MAX,
           version: int | None = None) -> str:
    """Writes the SavedModel of the model folder `model` (verified; a model root: its
    LATEST, held by a lease while it is read) to output/<version>/ and returns that
    path."""
    if top_k_max < 1:
        raise ValueError(f'--top_k_max must be >= 1, got {top_k_max}')
    if version is not None and int(version) < 1:
        raise ConfigError(f'--version must be 1 or more, got {version}: TF Serving '
                          'serves the highest numbered version, and 0 would never be '
                          'newer than another')
    base = output.rstrip('/')
    run_id = new_run_id()
    try:
        return _export(model, base, top_k_max, version, run_id)
    finally:
        release_holds(run_id)


def _export(model: str, base: str, top_k_max: int, version: int | None, run_id: str) -> str:
    probe = OutputGuard(base, 'savedmodel')
    probe.check_target()
    probe.check_reads([('--model', model)])
    folder = hold_model(model, run_id)
    probe.check_reads([('--model', folder)])
    check_base(base)
    version = next_version(base) if version is None else int(version)
    final = f'{base}/{version}'
    guard = OutputGuard(final, 'savedmodel', any_sibling=True)
    guard.check_target()
    sha = hashlib.sha256(read_manifest_bytes(folder)).hexdigest()
    rec = Recommender.load(folder)      # verified before anything is written
    staging = guard.start(run_id)
    try:
        with tempfile.TemporaryDirectory(prefix='wals-export-') as tmp:
            os.makedirs(os.path.join(tmp, 'assets'))
            module = ServingModule(rec, top_k_max, os.path.join(tmp, 'assets'))
            signatures = {'serving_default': module.recommend.get_concrete_function(),
                          'recommend': module.recommend.get_concrete_function(),
                          'similar_items': module.similar_items.get_concrete_function()}
            try:
                if local_path(staging) is not None:
                    tf.saved_model.save(module, staging, signatures=signatures)
                else:   # saved locally, then copied: TensorFlow need not know gs://
                    local = os.path.join(tmp, 'saved')
                    tf.saved_model.save(module, local, signatures=signatures)
                    _copy_tree(local, staging)
                guard.publish(staging, {
                    'kind': 'savedmodel', 'run_id': run_id, 'version': version,
                    'inputs': [{'model': folder, 'manifest_sha256': sha,
                                'model_run_id': rec.files.manifest.get('run_id')}],
                    'parameters': {'top_k_max': top_k_max}})
            except BaseException:
                discard(staging)
                raise
    finally:
        guard.close()
    return final


def _copy_tree(local: str, dest: str) -> None:
    for here, _, names in os.walk(local):
        for name in names:
            path = os.path.join(here, name)
            rel = os.path.relpath(path, local).replace(os.sep, '/')
            with open(path, 'rb') as f, FileSystems.create(f'{dest}/{rel}') as out:
                out.write(f.read())

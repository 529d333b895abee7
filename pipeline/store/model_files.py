"""Reading a published model folder back, verified against its _SUCCESS manifest.

Used by everything that consumes a model (recommendations, export, warm starts):
a folder without `_SUCCESS`, or with a file that does not match its checksum, is
refused with UntrustedModel. Works on any Beam filesystem (local, gs://); arrays
are loaded with allow_pickle=False, so nothing read can execute code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.store.publish import (SUCCESS, UntrustedModel, old_copies, read_manifest,
                              read_manifest_bytes)
from wals_core.models import get_model
from wals_core.params import WalsParams

SEEN_FOLDER = 'model/seen'   # part-NNNNN.npz per row block: the items each user rated
SEEN_PREFIX = f'{SEEN_FOLDER}/'


@dataclasses.dataclass
class ModelFiles:
    """A verified model: IDs, factors (k columns), biases (explicit), parameters."""
    path: str
    manifest: dict
    params: WalsParams
    users: np.ndarray            # user ID of row i
    items: np.ndarray            # item ID of column j
    row: np.ndarray              # users × k float32
    col: np.ndarray              # items × k float32
    col_counts: np.ndarray = None  # training ratings per item (int64)
    row_bias: np.ndarray | None = None    # explicit only
    col_bias: np.ndarray | None = None
    global_mean: float = 0.0

    @property
    def seen_parts(self) -> list[str]:
        """Paths of the model/seen/part-*.npz files (block order)."""
        return [f'{self.path}/{f}' for f in sorted(self.manifest['files'])
                if f.startswith(SEEN_PREFIX)]

    def load_seen(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr over all users, item indices int32) of the items each user rated,
        verified against the manifest."""
        n = len(self.users)
        counts = np.zeros(n, np.int64)
        pieces = []
        for path in self.seen_parts:
            rel = path[len(self.path) + 1:]
            start, indptr, indices = load_seen_part(self.path, rel, read_verified(
                self.path, self.manifest, rel))
            counts[start:start + len(indptr) - 1] = np.diff(indptr)
            pieces.append((start, indices))
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        indices = np.concatenate([p[1] for p in sorted(pieces, key=lambda p: p[0])]) \
            if pieces else np.zeros(0, np.int32)
        return indptr, indices.astype(np.int32, copy=False)


def load_seen_part(root: str, rel: str, data: bytes) -> tuple[int, np.ndarray, np.ndarray]:
    """(first user row, indptr, item indices) of a model/seen/part-*.npz."""
    start, indptr, indices = load_array(root, rel, data, ('start', 'indptr', 'indices'))
    try:
        start = int(start)
    except (TypeError, ValueError):
        raise UntrustedModel(f'{root}/{rel} has no integer start row: an untrusted '
                             'model, refused') from None
    return start, indptr, indices


def read_verified(root: str, manifest: dict, rel: str) -> bytes:
    """The bytes of root/rel after checking them against the manifest."""
    want = manifest.get('files', {}).get(rel)
    if want is None:
        raise UntrustedModel(f'{root}/{rel} is not listed in its {SUCCESS} manifest')
    try:
        with FileSystems.open(f'{root}/{rel}') as f:
            data = f.read()
    except Exception as e:   # noqa: BLE001 - missing, or unreadable: say which file
        reason = 'is missing' if not FileSystems.exists(f'{root}/{rel}') else \
            f'cannot be read ({e})'
        raise UntrustedModel(f'{root}/{rel} {reason}, but its {SUCCESS} manifest lists '
                             'it: the model folder changed after it was published') from None
    if len(data) != want['bytes'] or hashlib.sha256(data).hexdigest() != want['sha256']:
        raise UntrustedModel(f'{root}/{rel} does not match its {SUCCESS} checksum: the '
                             'model folder changed after it was published')
    return data


def load_array(root: str, rel: str, data: bytes,
               keys: tuple[str, ...] = ()) -> np.ndarray | tuple[np.ndarray, ...]:
    """An array of a model file (.npy; or the arrays `keys` of an .npz) without
    pickles: a file that holds Python objects, or is no array file at all, is an
    UntrustedModel naming it (np.load raises ValueError for an object array without
    allow_pickle)."""
    try:
        if not keys:
            return np.load(io.BytesIO(data), allow_pickle=False)
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return tuple(z[k] for k in keys)
    except (ValueError, OSError, KeyError, EOFError) as e:
        raise UntrustedModel(f'{root}/{rel} is not a plain numeric array file ({e}): an '
                             'untrusted model, refused') from None


def _npy(root: str, manifest: dict, name: str) -> np.ndarray:
    rel = f'model/{name}.npy'
    return load_array(root, rel, read_verified(root, manifest, rel))


def params_from_manifest(manifest: dict) -> WalsParams:
    """The WalsParams a model was trained with (its manifest's parameters)."""
    fields = {f.name for f in dataclasses.fields(WalsParams)}
    return WalsParams(**{k: v for k, v in manifest['parameters'].items() if k in fields})


def load_model_files(path: str) -> ModelFiles:
    """The model published at `path` (local or gs://; a model root: its LATEST),
    every file verified."""
    root = resolve_model_path(path)
    manifest = read_manifest(root)
    try:
        params = params_from_manifest(manifest)
    except (KeyError, TypeError, AttributeError) as e:
        raise UntrustedModel(f'{root}/{SUCCESS} is not the manifest of a model (no usable '
                             f'parameters: {e})') from None
    out = ModelFiles(root, manifest, params, _npy(root, manifest, 'user'),
                     _npy(root, manifest, 'item'), _npy(root, manifest, 'row'),
                     _npy(root, manifest, 'col'), _npy(root, manifest, 'col_counts'))
    if get_model(params.model).has_bias:
        out.row_bias = _npy(root, manifest, 'row_bias')
        out.col_bias = _npy(root, manifest, 'col_bias')
        out.global_mean = float(_npy(root, manifest, 'global_mean'))
    return out


def read_model(path: str) -> dict[str, np.ndarray]:
    """The published model {user, item, row, col} of `path` (a model folder, or a
    model root: its LATEST), after checking _SUCCESS and the checksums."""
    root = resolve_model_path(path)
    manifest = read_manifest(root)
    return {name: _npy(root, manifest, name) for name in ('user', 'item', 'row', 'col')}


LATEST = 'LATEST'


@dataclasses.dataclass(frozen=True)
class PreviousModel:
    """--previous_model, resolved: the model folder, its parameters, and whether its
    factors seed this run (same --model and latent_factors, and not --no_warm_start)."""
    path: str
    params: WalsParams
    warm_start: bool


def resolve_model_path(path: str) -> str:
    """The model folder `path` names, for every reader:
    - a model root (it holds LATEST): the version LATEST names, after checking that
      its _SUCCESS is the one LATEST recorded (manifest_sha256);
    - a model folder with _SUCCESS: itself;
    - a folder an --overwrite was replacing when it was killed (no _SUCCESS, but a
      complete output.old-<run id> copy beside it): that copy;
    - anything else: path itself (the reader then refuses it)."""
    root = path.rstrip('/')
    latest = f'{root}/{LATEST}'
    if FileSystems.exists(latest):
        with FileSystems.open(latest) as f:
            pointer = json.loads(f.read())
        # The version under this root (so a root copied elsewhere still works);
        # "path" is where it was published.
        folder = (f'{root}/versions/{pointer["version"]}' if pointer.get('version')
                  else pointer['path'].rstrip('/'))
        want = pointer.get('manifest_sha256')
        if want and hashlib.sha256(read_manifest_bytes(folder)).hexdigest() != want:
            raise UntrustedModel(f'{latest} names {folder}, whose {SUCCESS} is not the one '
                                 'it recorded')
        return folder
    if not FileSystems.exists(f'{root}/{SUCCESS}'):
        copies = old_copies(root)
        if copies:
            return copies[0]
    return root


_CACHE: dict = {}


def cached_model_files(path: str) -> ModelFiles:
    """load_model_files, once per process and path (workers reuse it across stages)."""
    model = _CACHE.get(path)
    if model is None:
        model = _CACHE[path] = load_model_files(path)
    return model


def index_map(old_ids: np.ndarray, new_ids: np.ndarray) -> np.ndarray:
    """For each new ID, its row in old_ids, or -1 (IDs compared as text, so an int
    vocabulary and a str one still match)."""
    old = np.asarray(old_ids).astype(str)
    new = np.asarray(new_ids).astype(str)
    order = np.argsort(old, kind='stable')
    pos = np.searchsorted(old[order], new)
    pos = np.minimum(pos, max(len(old) - 1, 0))
    found = (old[order][pos] == new) if len(old) else np.zeros(len(new), bool)
    return np.where(found, order[pos], -1).astype(np.int64)


def stored_matrix(model: ModelFiles, side: str) -> np.ndarray:
    """The model's factors of one side as the trainer stores them between
    half-steps (explicit: bias as the last column)."""
    factors = model.row if side == 'row' else model.col
    bias = model.row_bias if side == 'row' else model.col_bias
    if bias is None:
        return np.asarray(factors, np.float32)
    return np.concatenate([factors, bias[:, None]], axis=1).astype(np.float32)

"""The model a server answers from: loaded, verified, and swapped when LATEST moves.

A ServedModel is immutable once built. The holder keeps a reference to the current
one; a request reads that reference once and uses it to the end, so a swap (one
attribute assignment) never mixes two models in a response and requests in flight
finish on the model they started with.

Verification before a model is served (`verify`): every file against the _SUCCESS
manifest (Recommender.load), LATEST's manifest_sha256 (model roots), the shapes of
IDs, factors, biases and seen items against each other and the parameters, finite
values everywhere, scores that cannot overflow float32, and one recommendation and
one similar-items query answered. A version that fails any of it is logged and
counted, and the model being served stays.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import json
import logging
import math
import threading
import time
from typing import Callable

import numpy as np

from pipeline.store.model_files import read_verified
from pipeline.store.model_root import (LATEST_METRICS, hold_model, read_latest, release_holds,
                                       version_name, version_path)
from pipeline.store.publish import new_run_id, read_manifest_bytes
from pipeline.serving.recommender import Recommender
from wals_core.topk import ItemLayout, top_k

log = logging.getLogger('pipeline.serving')

# A failed version is tried again after this many poll intervals, doubling up to
# MAX_RETRY_SECONDS (a transient storage error heals; a broken model is not reloaded
# on every poll).
MAX_RETRY_SECONDS = 300.0


class ModelInvalid(ValueError):
    """A model that loads but must not be served (shapes, non-finite values...)."""


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A verified model and what /model reports about it."""
    rec: Recommender
    version: str
    path: str
    manifest_sha256: str
    loaded_at: float
    metrics: dict
    gate: dict | None = None
    layout: ItemLayout | None = None   # the item side laid out once for top_k

    @property
    def info(self) -> dict:
        rec, manifest = self.rec, self.rec.files.manifest
        return {
            'version': self.version,
            'path': self.path,
            'model': rec.params.model,
            'trained_at': manifest.get('published'),
            'run_id': manifest.get('run_id'),
            'loaded_at': _iso(self.loaded_at),
            'latent_factors': int(rec.params.latent_factors),
            'users': int(len(rec.users)),
            'items': int(len(rec.items)),
            'seen_pairs': int(rec.seen_indptr[-1]),
            'metrics': self.metrics,
            'gate': self.gate,
        }


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat()


def _json_safe(value):
    """Non-finite floats -> None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def verify(rec: Recommender) -> None:
    """Raises ModelInvalid unless the model's arrays fit together and are finite."""
    p, users, items = rec.params, rec.users, rec.items
    kf = int(p.latent_factors)
    problems = []
    if users.ndim != 1 or items.ndim != 1 or not len(users) or not len(items):
        problems.append(f'user/item IDs must be non-empty 1-d arrays, got {users.shape} '
                        f'and {items.shape}')
    if rec.row.shape != (len(users), kf):
        problems.append(f'row factors are {rec.row.shape}, expected ({len(users)}, {kf})')
    if rec.col.shape != (len(items), kf):
        problems.append(f'col factors are {rec.col.shape}, expected ({len(items)}, {kf})')
    if rec.explicit:
        for name, arr, n in (('row_bias', rec.row_bias, len(users)),
                             ('col_bias', rec.col_bias, len(items))):
            if arr is None or np.shape(arr) != (n,):
                problems.append(f'{name} is {np.shape(arr)}, expected ({n},)')
    seen_ptr, seen_idx = rec.seen_indptr, rec.seen_indices
    if (seen_ptr[0] != 0 or seen_ptr[-1] != len(seen_idx) or np.any(np.diff(seen_ptr) < 0)
            or (len(seen_idx) and (seen_idx.min() < 0 or seen_idx.max() >= len(items)))):
        problems.append('seen items do not form a valid user x item index')
    if problems:
        raise ModelInvalid('; '.join(problems))
    arrays = {'row': rec.row, 'col': rec.col}
    if rec.explicit:
        arrays.update(row_bias=rec.row_bias, col_bias=rec.col_bias,
                      global_mean=np.array([rec.global_mean]))
    bad = [name for name, arr in arrays.items() if not np.all(np.isfinite(arr))]
    if bad:
        raise ModelInvalid(f'non-finite values in {", ".join(bad)}')
    # Every score u.v (+ biases) must be finite in float32 (JSON has no infinity).
    row_norm = float(np.sqrt(np.einsum('ij,ij->i', rec.row, rec.row, dtype=np.float64)).max())
    col_norm = float(np.sqrt(np.einsum('ij,ij->i', rec.col, rec.col, dtype=np.float64)).max())
    bias = 0.0
    if rec.explicit:
        bias = abs(rec.global_mean) + float(np.abs(rec.row_bias).max()) + \
            float(np.abs(rec.col_bias).max())
    if row_norm * col_norm + bias > float(np.finfo(np.float32).max) / 4:
        raise ModelInvalid('factors so large that scores would overflow float32')
    # The canary: one query of each kind answers.
    rec.recommend(rec.user_id(0), k=1)
    rec.similar_items(rec.item_id(0), k=1)


def _metrics(rec: Recommender, latest: dict | None) -> dict:
    """The model's metrics.json values of LATEST_METRICS (LATEST's copy if the model
    has no metrics.json)."""
    manifest = rec.files.manifest
    out = {}
    if 'metrics.json' in manifest.get('files', {}):
        full = json.loads(read_verified(rec.files.path, manifest, 'metrics.json'))
        out = {k: full[k] for k in LATEST_METRICS if k in full}
    elif latest:
        out = dict(latest.get('metrics') or {})
    return {k: _json_safe(v) for k, v in out.items()}


def _gate(rec: Recommender) -> dict | None:
    """The promotion gate's verdict from the model's report.json (None without one)."""
    manifest = rec.files.manifest
    if 'report.json' not in manifest.get('files', {}):
        return None
    gate = json.loads(read_verified(rec.files.path, manifest, 'report.json')).get('gate')
    if not isinstance(gate, dict):
        return None
    return {k: _json_safe(gate.get(k)) for k in ('passed', 'metric', 'max_regression', 'reason')}


def load_model(path: str, version: str | None = None, manifest_sha256: str | None = None,
               latest: dict | None = None) -> ServedModel:
    """Loads and verifies the model at `path` (a model folder, or a model root: its
    LATEST once). manifest_sha256: the _SUCCESS LATEST recorded for it. A version
    of a model root is named in a lease while it loads (ROOT/leases/, released
    after): pruning does not delete it under the load (docs/reliability.md)."""
    run_id = new_run_id()
    try:
        return _load_model(hold_model(path, run_id), version, manifest_sha256, latest)
    finally:
        release_holds(run_id)


def _load_model(path: str, version: str | None, manifest_sha256: str | None,
                latest: dict | None) -> ServedModel:
    rec = Recommender.load(path)
    folder = rec.files.path
    raw = read_manifest_bytes(folder)
    sha = hashlib.sha256(raw).hexdigest()
    if manifest_sha256 and sha != manifest_sha256:
        raise ModelInvalid(f'{folder}/_SUCCESS is not the one LATEST recorded')
    if json.loads(raw) != rec.files.manifest:
        raise ModelInvalid(f'{folder}/_SUCCESS changed while the model was loading')
    verify(rec)
    layout = ItemLayout(rec.col, rec.col_bias)
    # Its padded copy for the default k made now, not by the first request.
    top_k(rec.row[:1], layout, 10, num_threads=1)
    if version is None:
        run_id = rec.files.manifest.get('run_id')
        version = version_name(run_id) if run_id and '-' in run_id else sha[:16]
    return ServedModel(rec=rec, version=version, path=folder, manifest_sha256=sha,
                       loaded_at=time.time(), metrics=_metrics(rec, latest), gate=_gate(rec),
                       layout=layout)


class ModelHolder:
    """The current ServedModel, and for a model root the poller that replaces it.

    listener(event, **details) is told of 'loaded' (model=ServedModel), 'failed'
    (version, error) and 'poll_error' (error): the app turns them into metrics."""

    def __init__(self, *, model: str | None = None, model_root: str | None = None,
                 poll_interval: float = 30.0,
                 listener: Callable[..., None] | None = None):
        if (model is None) == (model_root is None):
            raise ValueError('give exactly one of model and model_root')
        self.model_path, self.model_root = model, model_root
        self.poll_interval = float(poll_interval)
        self.current: ServedModel | None = None
        self.not_ready_reason = 'no model loaded yet'
        self.listener = listener or (lambda event, **details: None)
        self._failed: dict[tuple[str, str], tuple[float, float]] = {}  # -> (retry at, wait)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()   # one load at a time

    # ---- loading -----------------------------------------------------------------

    def load_fixed(self) -> ServedModel:
        """--model: loads it once (errors propagate: the server does not start)."""
        served = load_model(self.model_path)
        self._swap(served)
        return served

    def poll_once(self) -> bool:
        """--model_root: reads LATEST and, if it names a version other than the one
        served, loads, verifies and swaps it in. True if the model changed."""
        with self._lock:
            try:
                latest = read_latest(self.model_root)
            except Exception as e:   # noqa: BLE001 - storage errors: keep serving
                self._report_poll_error(e)
                return False
            if latest is None:
                if self.current is None:
                    self.not_ready_reason = (f'no version promoted under {self.model_root} '
                                             'yet (no LATEST)')
                return False
            version = str(latest.get('version') or '')
            sha = str(latest.get('manifest_sha256') or '')
            current = self.current
            if current is not None and current.version == version and \
                    current.manifest_sha256 == sha:
                return False
            key = (version, sha)
            retry = self._failed.get(key)
            now = time.monotonic()
            if retry is not None and now < retry[0]:
                return False
            path = version_path(self.model_root, version) if version else latest.get('path')
            try:
                served = load_model(path, version=version or None,
                                    manifest_sha256=sha or None, latest=latest)
            except Exception as e:   # noqa: BLE001 - any failure keeps the old model
                wait = min(MAX_RETRY_SECONDS, 2 * retry[1] if retry else self.poll_interval)
                self._failed[key] = (now + wait, wait)
                what = f'version {version}' if version else f'LATEST ({path})'
                keeping = f'still serving {current.version}' if current else 'not ready'
                log.error('%s under %s failed to load or verify (%s); %s; next try in '
                          '%.0f s unless LATEST moves', what, self.model_root,
                          one_line(e), keeping, wait)
                if current is None:
                    self.not_ready_reason = f'{what} failed to load: {one_line(e)}'
                self.listener('failed', version=version, error=e)
                return False
            self._failed.pop(key, None)
            self._swap(served)
            return True

    def _report_poll_error(self, e: Exception) -> None:
        log.error('reading %s/LATEST failed: %s', self.model_root, one_line(e))
        if self.current is None:
            self.not_ready_reason = f'reading LATEST failed: {one_line(e)}'
        self.listener('poll_error', error=e)

    def _swap(self, served: ServedModel) -> None:
        old = self.current
        self.current = served          # the atomic step: one reference assignment
        # The new model's objects out of the cyclic collector's sight, as the
        # server's own at start (server.py); refcounting still frees the old model.
        gc.freeze()
        log.info('serving model version %s (%s)%s', served.version, served.path,
                 f', replacing {old.version}' if old else '')
        self.listener('loaded', model=served, previous=old)

    # ---- the poller thread -------------------------------------------------------

    def start(self) -> None:
        """Starts polling LATEST every poll_interval seconds (model roots only)."""
        if self.model_root is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name='wals-serve-poll', daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.poll_once()
            except Exception:   # noqa: BLE001 - the poller must never die
                log.exception('unexpected error while polling %s', self.model_root)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f'{type(e).__name__}: {text[0] if text else ""}'

"""The batch recommendation graph: top-K items per user (or similar items per item)
from a published model, one output shard per work unit.

Work unit: one seen part of the model (model/seen/part-NNNNN.npz, the users of one
training row block) for recommendations; a fixed slice of ITEMS_PER_SHARD query
items for similar items. Each unit is scored by wals_core.topk and written as one
file, `<kind>-<shard>-of-<shards>.<format>`, by the worker itself: its bytes
depend only on the model, the unit and the options (the kernel is deterministic per
row, rows are in row order, scores are float32 printed with '%.9g', which
round-trips float32), so every runner and every retry writes the same file.

The model reaches workers by path: every worker process loads and verifies it once
(cached by path and the SHA-256 of its _SUCCESS manifest) instead of receiving the
factors as a side input. That costs one read of the factor files per process and
avoids pickling them into every bundle; a manifest that changed since the launcher
verified it stops the run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import threading
import time

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.errors import InputError
from pipeline.store.model_files import (ModelFiles, load_model_files, load_seen_part,
                                        read_verified)
from pipeline.strict_json import dumps
from pipeline.store.publish import SUCCESS, UntrustedModel
from wals_core.models import get_model
from wals_core.topk import similar_items, top_k

log = logging.getLogger('pipeline.cli.recommend')

FORMATS = ('jsonl', 'csv', 'parquet')
ITEMS_PER_SHARD = 8192          # query items per similar-items shard
WORK_DIR = '_work'              # inside the staging folder, never published
SELECTION = f'{WORK_DIR}/selection.npy'    # row numbers chosen by --users / --items
STATS = f'{WORK_DIR}/stats.json'


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What a batch run computes (picklable: it travels to the workers)."""
    model: str                    # model folder (local or gs://)
    manifest_sha256: str | None   # of its _SUCCESS as verified by the launcher (None:
    #                               a dry run or template: the manifest found at run time)
    staging: str                  # where the shards go
    similar: bool = False         # similar items instead of recommendations
    top_k: int = 10
    include_seen: bool = False
    fmt: str = 'jsonl'
    selected: bool = False        # rows restricted to staging/SELECTION
    kernel_threads: int | None = None

    @property
    def kind(self) -> str:
        return 'similar_items' if self.similar else 'recommendations'

    def shard_path(self, shard: int, shards: int) -> str:
        return f'{self.staging}/{self.kind}-{shard:05d}-of-{shards:05d}.{self.fmt}'


# ---- the model, once per worker process -------------------------------------------

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str], ModelFiles] = {}
_SELECTIONS: dict[str, np.ndarray] = {}
_ENCODED: dict[tuple, list[str]] = {}


def manifest_sha256(model: str) -> tuple[str, bytes]:
    """(SHA-256 hex, bytes) of a model's _SUCCESS manifest."""
    path = f'{model.rstrip("/")}/{SUCCESS}'
    if not FileSystems.exists(path):
        raise UntrustedModel(f'{model} has no {SUCCESS}: not a finished model')
    with FileSystems.open(path) as f:
        data = f.read()
    return hashlib.sha256(data).hexdigest(), data


def remember_model(files: ModelFiles, sha: str) -> None:
    """Seeds this process's cache (the launcher's verified copy, for in-process runners)."""
    with _LOCK:
        _MODELS[(files.path, sha)] = files


def cached_model(spec: BatchSpec) -> ModelFiles:
    """The verified model of spec, loaded at most once per process."""
    root = spec.model.rstrip('/')
    with _LOCK:
        for (path, sha), files in _MODELS.items():
            if path == root and (spec.manifest_sha256 in (None, sha)):
                return files
        try:
            sha, data = manifest_sha256(root)
            if spec.manifest_sha256 is not None and sha != spec.manifest_sha256:
                raise UntrustedModel(f'{root}/{SUCCESS} changed after the run started: '
                                     'the model was republished; run again')
            files = load_model_files(root)
            if json.loads(data) != files.manifest:
                raise UntrustedModel(f'{root}/{SUCCESS} changed while it was read')
        except UntrustedModel as e:
            raise InputError(str(e)) from None   # the launcher prints it, no traceback
        _MODELS[(root, sha)] = files
        return files


def _selection(spec: BatchSpec) -> np.ndarray | None:
    if not spec.selected:
        return None
    path = f'{spec.staging}/{SELECTION}'
    with _LOCK:
        if path not in _SELECTIONS:
            with FileSystems.open(path) as f:
                _SELECTIONS[path] = np.load(io.BytesIO(f.read()), allow_pickle=False)
        return _SELECTIONS[path]


# ---- output encodings ------------------------------------------------------------

def _csv_field(text: str) -> str:
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def encode_ids(ids: np.ndarray, fmt: str) -> list[str]:
    """Each ID as it appears in a JSON Lines or CSV file (ints bare, strings quoted
    as the format requires)."""
    values = ids.tolist()
    if ids.dtype.kind in 'iu':
        return [str(v) for v in values]
    if fmt == 'jsonl':
        return [dumps(v, ensure_ascii=False) for v in values]
    return [_csv_field(v) for v in values]


def _encoded(files: ModelFiles, side: str, fmt: str) -> list[str]:
    key = (files.path, id(files), side, fmt)
    with _LOCK:
        if key not in _ENCODED:
            _ENCODED[key] = encode_ids(getattr(files, side), fmt)
        return _ENCODED[key]


def shard_bytes(fmt: str, similar: bool, query_ids, query_text: list[str],
                item_ids, item_text: list[str], ids: np.ndarray,
                scores: np.ndarray) -> bytes:
    """One shard's file: a line (JSON Lines) or k rows (CSV, Parquet) per query, in
    rank order, padding (-1) left out."""
    key, list_key = ('item', 'similar') if similar else ('user', 'items')
    n, k = ids.shape
    valid = ids >= 0
    full = valid.all(axis=1)
    if fmt == 'parquet':
        return _parquet(key, 'similar_item' if similar else 'item', query_ids, item_ids,
                        ids, scores, valid)
    text = np.asarray(item_text, dtype=object)
    safe = np.where(valid, ids, 0)
    cells = np.empty((n, 2 * k), dtype=object)
    cells[:, 0::2] = text[safe]
    cells[:, 1::2] = scores.astype(np.float64)
    rows = cells.tolist()
    if fmt == 'jsonl':
        entry = '{"item": %s, "score": %.9g}'
        head = '{"%s": %%s, "%s": [' % (key, list_key)
        fmt_full = head + ', '.join([entry] * k) + ']}\n'
        out = []
        for q, row, ok, m in zip(query_text, rows, full, valid.sum(axis=1).tolist()):
            if ok:
                out.append(fmt_full % (q, *row))
            else:
                out.append((head + ', '.join([entry] * m) + ']}\n') % (q, *row[:2 * m]))
        return ''.join(out).encode('utf-8')
    header = f'{key},rank,{"similar_item" if similar else "item"},score\n'
    line = ''.join(f'%s,{r + 1},%s,%.9g\n' for r in range(k))
    out = [header]
    for q, row, ok, m in zip(query_text, rows, full, valid.sum(axis=1).tolist()):
        m = k if ok else m
        if m == k:
            out.append(line % tuple(x for j in range(k) for x in (q, row[2 * j],
                                                                   row[2 * j + 1])))
        else:
            out.append(''.join(f'{q},{j + 1},{row[2 * j]},{row[2 * j + 1]:.9g}\n'
                               for j in range(m)))
    return ''.join(out).encode('utf-8')


def _parquet(key: str, item_key: str, query_ids: np.ndarray, item_ids: np.ndarray,
             ids: np.ndarray, scores: np.ndarray, valid: np.ndarray) -> bytes:
    """Long format: one row per (query, rank): key, rank (int32, from 1), item, score
    (float32). IDs keep the model's type (int64 or string)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    n, k = ids.shape
    qi, rank = np.nonzero(valid)          # row-major: queries in order, ranks ascending
    table = pa.table({
        key: pa.array(query_ids[qi]),
        'rank': pa.array((rank + 1).astype(np.int32)),
        item_key: pa.array(item_ids[ids[qi, rank]]),
        'score': pa.array(scores[qi, rank].astype(np.float32)),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression='snappy')
    return buf.getvalue()


# ---- the work units --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shard:
    index: int
    total: int
    part: str | None = None        # recommendations: the seen part (relative path)
    lo: int = 0                    # similar items: query positions [lo, hi)
    hi: int = 0


def list_shards(spec: BatchSpec) -> list[Shard]:
    """The work units of a run (read from the model's manifest, on a worker)."""
    files = cached_model(spec)
    if not spec.similar:
        parts = [p[len(files.path) + 1:] for p in files.seen_parts]
        if not parts:
            raise InputError(f'{files.path} has no model/seen/ parts: trained by an '
                             'older version; train it again to recommend from it')
        return [Shard(i, len(parts), part=p) for i, p in enumerate(parts)]
    sel = _selection(spec)
    n = len(files.items) if sel is None else len(sel)
    total = max(1, -(-n // ITEMS_PER_SHARD))
    return [Shard(i, total, lo=i * ITEMS_PER_SHARD, hi=min(n, (i + 1) * ITEMS_PER_SHARD))
            for i in range(total)]


class WriteShard(beam.DoFn):
    """Shard -> stats dict; writes the shard's file into the staging folder."""

    def __init__(self, spec: BatchSpec):
        self._spec = spec
        self._rows = Metrics.counter('recommend', 'rows')
        self._short = Metrics.counter('recommend', 'short_lists')

    def process(self, shard: Shard):
        spec = self._spec
        t0 = time.perf_counter()
        files = cached_model(spec)
        sel = _selection(spec)
        if spec.similar:
            query = (np.arange(shard.lo, shard.hi, dtype=np.int64) if sel is None
                     else sel[shard.lo:shard.hi].astype(np.int64))
            ids, scores = similar_items(files.col, self._k(files), query_ids=query,
                                        num_threads=spec.kernel_threads)
            q_ids, q_text = files.items[query], _encoded(files, 'items', spec.fmt)
        else:
            query, ids, scores = self._recommend(files, shard, sel)
            q_ids, q_text = files.users[query], _encoded(files, 'users', spec.fmt)
        q_text = [q_text[i] for i in query.tolist()]
        bad = ~np.isfinite(scores) & (ids >= 0)
        if np.any(bad):   # '%.9g' would write nan or inf: not JSON, not a score
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            raise InputError(f'{spec.model}: the scores of {int(bad.any(axis=1).sum())} '
                             f'{"item" if spec.similar else "user"}(s) are not finite '
                             f'numbers (the first: {q_ids[row]!r}); the model\'s factors are '
                             'too large for float32 scores')
        data = shard_bytes(spec.fmt, spec.similar, q_ids, q_text, files.items,
                           _encoded(files, 'items', spec.fmt) if spec.fmt != 'parquet'
                           else [], ids, scores)
        with FileSystems.create(spec.shard_path(shard.index, shard.total)) as f:
            f.write(data)
        # A list is short when it has fewer than --top_k items (every list, when
        # --top_k is more than the model's items: the kernel ran with that many).
        short = (len(query) if self._k(files) < spec.top_k else
                 int(np.count_nonzero(ids[:, -1] < 0)) if ids.shape[1] else 0)
        self._rows.inc(len(query))
        self._short.inc(short)
        every = max(1, shard.total // 20)
        if shard.index % every == 0 or shard.index == shard.total - 1:
            log.info('%s: shard %d of %d done (%d %s, %.2f s)', spec.kind, shard.index + 1,
                     shard.total, len(query), 'items' if spec.similar else 'users',
                     time.perf_counter() - t0)
        yield {'shards': 1, 'rows': len(query), 'short_lists': short,
               'bytes': len(data), 'seconds': time.perf_counter() - t0}

    def _k(self, files: ModelFiles) -> int:
        """--top_k, or the model's number of items if that is smaller: no list can be
        longer, and the kernel's arrays are queries x k."""
        return min(self._spec.top_k, len(files.items))

    def _recommend(self, files: ModelFiles, shard: Shard, sel):
        spec = self._spec
        try:
            start, indptr, indices = load_seen_part(
                files.path, shard.part, read_verified(files.path, files.manifest, shard.part))
        except UntrustedModel as e:
            raise InputError(str(e)) from None
        n = len(indptr) - 1
        rows = np.arange(n, dtype=np.int64)
        if sel is not None:   # the chosen users of this part
            lo, hi = np.searchsorted(sel, [start, start + n])
            rows = sel[lo:hi].astype(np.int64) - start
        excl = {}
        if not spec.include_seen:
            counts = np.diff(indptr)[rows]
            sub = np.zeros(len(rows) + 1, np.int64)
            np.cumsum(counts, out=sub[1:])
            take = (np.repeat(indptr[rows] - sub[:-1], counts)
                    + np.arange(sub[-1], dtype=np.int64))
            excl = dict(exclude_indptr=sub, exclude_indices=indices[take])
        users = start + rows
        has_bias = get_model(files.params.model).has_bias
        offsets = files.col_bias if has_bias else None
        ids, scores = top_k(files.row[users], files.col, self._k(files), item_offsets=offsets,
                            num_threads=spec.kernel_threads, **excl)
        if has_bias:
            # The predicted rating μ + b_u + c_j + u·v: the kernel ranked by u·v + c_j
            # (μ and b_u are the same for every item of a user).
            shift = files.global_mean + files.row_bias[users].astype(np.float64)
            scores = (scores.astype(np.float64) + shift[:, None]).astype(np.float32)
        return users, ids, scores


def merge_stats(stats) -> dict:
    out = {'shards': 0, 'rows': 0, 'short_lists': 0, 'bytes': 0, 'seconds': 0.0}
    for s in stats:
        for k in out:
            out[k] += s[k]
    out['seconds'] = round(out['seconds'], 3)
    return out


def _write_stats(stats: dict, path: str) -> None:
    with FileSystems.create(path) as f:
        f.write(dumps(stats, sort_keys=True).encode('utf-8'))


class BatchRecommend(beam.PTransform):
    """PBegin -> nothing useful downstream: lists the work units of `spec` (one per
    seen part, or per slice of query items), spreads them over the workers, writes
    one shard file per unit into spec.staging and the summed stats to
    spec.staging/_work/stats.json."""

    def __init__(self, spec: BatchSpec):
        super().__init__()
        self._spec = spec

    def expand(self, pbegin):
        spec = self._spec
        return (pbegin
                | 'Model' >> beam.Create([spec])
                | 'Shards' >> beam.FlatMap(list_shards)
                | 'Spread' >> beam.Reshuffle()
                | 'Write' >> beam.ParDo(WriteShard(spec))
                | 'Stats' >> beam.CombineGlobally(merge_stats)
                | 'WriteStats' >> beam.Map(_write_stats, f'{spec.staging}/{STATS}'))


def build_pipeline(pipeline: beam.Pipeline, spec: BatchSpec) -> None:
    _ = pipeline | ('SimilarItems' if spec.similar else 'Recommend') >> BatchRecommend(spec)

"""Top-K scoring for the server: concurrent requests batched into one kernel call.

wals_core.topk.top_k has a fixed cost per call and a small cost per query row, so
scoring each request alone caps a server at about a thousand requests a second. Part
of the fixed cost (laying out the item matrix for the BLAS phase: about 1 ms for 10k
items x 32 factors) is paid once per model: each ServedModel carries an ItemLayout.
The Scorer queues the requests that the event loop has read and scores them together
in one call, on the event loop's thread: a worker thread measured slower (the GIL
passes back and forth between it and the loop for every batch; 30-40% fewer requests
a second at 32 clients), and the kernel holds the GIL most of the time anyway. There
is no waiting for a batch to fill: an idle server scores a lone request after one turn
of the event loop; under load, the requests that arrive while one batch is scored
form the next.

Results do not depend on the batching: top_k's ranking of a row depends only on that
row (its contract), and a row's top k is the first k of its top K for any K >= k (the
order is total: score descending, then item row ascending). Rows are grouped by model,
so a batch that straddles a model swap scores each request on its own model.
Scores are those of pipeline.serving.recommender.Recommender: u.v (+ the explicit model's
global mean, user bias and item bias).
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Callable

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.serving.model_holder import ServedModel
from wals_core.topk import similar_items, top_k

# Query rows per kernel call at most (a burst larger than this takes several calls).
MAX_ROWS_PER_CALL = 1024
_EMPTY = np.zeros(0, np.int64)


@dataclasses.dataclass(eq=False)
class RankJob:
    """Top k items for a stored user row (k factors, + bias for explicit), leaving out
    `exclude` (item rows) and, with `allow`, every item not in it (sorted rows)."""
    model: ServedModel
    query: np.ndarray
    k: int
    exclude: np.ndarray = dataclasses.field(default_factory=lambda: _EMPTY)
    allow: np.ndarray | None = None


@dataclasses.dataclass(eq=False)
class SimilarJob:
    """The k items most cosine-similar to item row `item` (never itself)."""
    model: ServedModel
    item: int
    k: int


@dataclasses.dataclass(eq=False)
class CallJob:
    """Any other numpy work (fold-in solves), run in turn with the batches."""
    fn: Callable[[], Any]


Result = list[tuple[int, float]]   # (item row, score), best first


class Scorer:
    """Runs jobs on the event loop, batching the RankJobs and SimilarJobs that wait
    together into one top_k / similar_items call per model.

    BLAS is held to one thread for the whole process: top_k asks for one thread per
    call and restores the previous count after it, and OpenBLAS waking its thread pool
    again after every call made requests several times slower (measured on a worker
    thread: 20-40 ms instead of 2-4 ms for the 10m model). A server's parallelism is
    across requests anyway."""

    def __init__(self, on_batch: Callable[[int], None] | None = None):
        threadpool_limits(1, user_api='blas')
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._draining = False
        self._on_batch = on_batch or (lambda n: None)

    async def run(self, job) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((job, future))
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await future

    async def run_many(self, jobs: list) -> list:
        """Several jobs of one request: they are queued together, so scored together."""
        if len(jobs) == 1:      # most requests: no task per job
            return [await self.run(jobs[0])]
        return await asyncio.gather(*(self.run(job) for job in jobs))

    async def _drain(self) -> None:
        try:
            # One turn of the event loop first: the requests it has already read
            # queue up behind this one and are scored in the same call.
            await asyncio.sleep(0)
            while self._pending:
                batch = self._pending[:MAX_ROWS_PER_CALL]
                del self._pending[:MAX_ROWS_PER_CALL]
                outcomes = self._score([job for job, _ in batch])
                for (_, future), (ok, value) in zip(batch, outcomes):
                    if future.done():       # the client went away
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                await asyncio.sleep(0)      # answer these before scoring the next batch
        finally:
            self._draining = False

    def _score(self, jobs: list) -> list[tuple[bool, Any]]:
        """(ok, result or exception) of each job, in order (on the worker thread)."""
        out: list[tuple[bool, Any] | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            if isinstance(job, RankJob) and job.allow is None:
                groups.setdefault(('rank', id(job.model)), []).append(i)
            elif isinstance(job, SimilarJob):
                groups.setdefault(('similar', id(job.model)), []).append(i)
            else:
                groups[('one', i)] = [i]
        for (kind, _), idx in groups.items():
            group = [jobs[i] for i in idx]
            try:
                if kind == 'rank':
                    self._on_batch(len(group))
                    results = _rank(group)
                elif kind == 'similar':
                    self._on_batch(len(group))
                    results = _similar(group)
                elif isinstance(group[0], RankJob):
                    results = [_rank_allowed(group[0])]
                else:
                    results = [group[0].fn()]
                for i, r in zip(idx, results):
                    out[i] = (True, r)
            except Exception as e:   # noqa: BLE001 - handed to the waiting requests
                for i in idx:
                    out[i] = (False, e)
        return out

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()


def _pairs(ids: np.ndarray, scores: np.ndarray, k: int, shift: float) -> Result:
    ids, scores = ids[:k], scores[:k]
    keep = ids >= 0
    # tolist: Python ints and floats (float32 widened exactly) without numpy scalars.
    return [(j, s + shift) for j, s in zip(ids[keep].tolist(), scores[keep].tolist())]


def _shift(model: ServedModel, query: np.ndarray) -> float:
    """What Recommender adds to u.v + c_j: the explicit model's mu + b_u."""
    rec = model.rec
    return rec.global_mean + float(query[rec.params.latent_factors]) if rec.explicit else 0.0


def _rank(jobs: list[RankJob]) -> list[Result]:
    rec = jobs[0].model.rec
    kf = rec.params.latent_factors
    queries = np.stack([np.asarray(j.query, np.float32)[:kf] for j in jobs])
    counts = np.array([len(j.exclude) for j in jobs], np.int64)
    indptr = np.zeros(len(jobs) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.concatenate([j.exclude for j in jobs]) if indptr[-1] else _EMPTY
    kmax = max(j.k for j in jobs)
    layout = jobs[0].model.layout
    if layout is not None:     # the same bits as (rec.col, rec.col_bias), less work
        ids, scores = top_k(queries, layout, kmax, exclude_indptr=indptr,
                            exclude_indices=indices, num_threads=1)
    else:
        ids, scores = top_k(queries, rec.col, kmax, exclude_indptr=indptr,
                            exclude_indices=indices, item_offsets=rec.col_bias, num_threads=1)
    return [_pairs(ids[r], scores[r], j.k, _shift(j.model, j.query))
            for r, j in enumerate(jobs)]


def _rank_allowed(job: RankJob) -> Result:
    """Scores on the allowed items alone: the same per-pair scores as on all items,
    and the same tie order (allowed rows are ascending)."""
    rec = job.model.rec
    allowed = np.setdiff1d(job.allow, job.exclude, assume_unique=False)
    if not len(allowed):
        return []
    kf = rec.params.latent_factors
    offsets = None if rec.col_bias is None else rec.col_bias[allowed]
    ids, scores = top_k(np.asarray(job.query, np.float32)[None, :kf], rec.col[allowed], job.k,
                        item_offsets=offsets, num_threads=1)
    keep = ids[0] >= 0
    shift = _shift(job.model, job.query)
    return [(int(allowed[j]), float(s) + shift) for j, s in zip(ids[0][keep], scores[0][keep])]


def _similar(jobs: list[SimilarJob]) -> list[Result]:
    rec = jobs[0].model.rec
    kmax = max(j.k for j in jobs)
    ids, sims = similar_items(rec.col, kmax, query_ids=np.array([j.item for j in jobs]),
                              num_threads=1)
    return [_pairs(ids[r], sims[r], j.k, 0.0) for r, j in enumerate(jobs)]

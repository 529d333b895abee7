"""The HTTP API (FastAPI): routes, limits, JSON errors, the API key and /metrics.

Every route that answers from a model reads the holder's current model once, so the
whole response (and its X-Model-Version header) comes from one complete model even
while a new version is being swapped in. docs/serving.md documents each route.

Errors are JSON objects {"detail": ...}: 400 bad compatibility-route parameters,
401 missing or wrong API key, 404 unknown user or item, 413 body too large, 414
query string too large, 422 invalid parameters or body, 503 no model loaded yet.
"""
# No `from __future__ import annotations`: FastAPI reads the routes' annotations, which
# name types local to create_app.
import dataclasses
import glob
import hashlib
import hmac
import logging
import math
import os
import re
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

import numpy as np
from fastapi import Body, FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from prometheus_client import gc_collector, platform_collector, process_collector
from prometheus_client import multiprocess as shared_metrics
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.serving.model_holder import ModelHolder, ServedModel
from pipeline.serving.scorer import CallJob, RankJob, Scorer, SimilarJob
from wals_core.vocab import lookup_known

log = logging.getLogger('pipeline.serving')

VERSION_HEADER = 'X-Model-Version'
API_KEY_HEADER = 'X-API-Key'
# Reachable without the API key: what load balancers and orchestrators probe.
OPEN_PATHS = frozenset({'/healthz', '/readyz', '/readiness_check'})
ROUTES = ('/recommend', '/similar', '/fold_in', '/model', '/healthz', '/readyz', '/metrics',
          '/recommendation', '/readiness_check', '/openapi.json')
MAX_VALUE = 1e6            # |fold-in value| at most


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for (docs/serving.md, "Limits")."""
    max_k: int = 1000
    max_batch: int = 1000
    max_list: int = 1000
    max_id_length: int = 256
    max_body_bytes: int = 1 << 20
    max_query_bytes: int = 32 << 10
    compat_default_k: int = 5      # the original app's DEFAULT_RECS


class ApiError(Exception):
    def __init__(self, status: int, detail: str, version: str | None = None):
        super().__init__(detail)
        self.status, self.detail, self.version = status, detail, version


# ---- metrics -------------------------------------------------------------------------

class ServeMetrics:
    """Prometheus metrics in a registry of the app's own (one app, one registry).

    multiprocess: one worker of several (--workers N). prometheus-client then keeps
    every value in files of PROMETHEUS_MULTIPROC_DIR (set before the worker imported
    it), and exposition() adds up every worker's: counters and histograms are summed,
    gauges combined as their multiprocess_mode says."""

    def __init__(self, multiprocess: bool = False):
        self.multiprocess = multiprocess
        r = self.registry = CollectorRegistry()
        if not multiprocess:
            # They describe the one process collecting: with workers, that would be
            # whichever worker answered the scrape (and multiprocess mode cannot
            # aggregate custom collectors), so they are left out there.
            process_collector.ProcessCollector(registry=r)
            platform_collector.PlatformCollector(registry=r)
            gc_collector.GCCollector(registry=r)
        self.requests = Counter('wals_serve_requests', 'HTTP requests by endpoint, method and '
                                'status', ['endpoint', 'method', 'status'], registry=r)
        self.latency = Histogram(
            'wals_serve_request_duration_seconds', 'Time from request to response, by '
            'endpoint and status', ['endpoint', 'status'], registry=r,
            buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10))
        # Across workers (multiprocess_mode; one process ignores it): a version is 1 while
        # any worker serves it, the newest swap time counts, and ready means every
        # worker is. 'live': a worker's values are dropped once it is gone
        # (_forget_dead_workers), instead of counting forever.
        self.model_version = Gauge('wals_serve_model_version_info', 'The model version being '
                                   'served (value 1)', ['version'], registry=r,
                                   multiprocess_mode='livemax')
        self.model_loaded = Gauge('wals_serve_model_loaded_timestamp_seconds', 'When the '
                                  'served model was swapped in (Unix time)', registry=r,
                                  multiprocess_mode='livemax')
        self.ready = Gauge('wals_serve_ready', '1 when a verified model is loaded', registry=r,
                           multiprocess_mode='livemin')
        self.reloads = Counter('wals_serve_reloads', 'Model versions loaded, verified and '
                               'swapped in (the first one included)', registry=r)
        self.reload_failures = Counter('wals_serve_reload_failures', 'Versions that failed '
                                       'to load or verify, and failed reads of LATEST',
                                       registry=r)
        self.batch_rows = Histogram('wals_serve_score_batch_rows', 'Query rows per top-K '
                                    'kernel call (concurrent requests batched)', registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))

    def listener(self, event: str, **details) -> None:
        """ModelHolder events -> metrics (called from the poller thread too)."""
        if event == 'loaded':
            previous = details.get('previous')
            if previous is not None and self.multiprocess:
                # A series cannot be removed from the shared files: 0 says this worker
                # no longer serves that version.
                self.model_version.labels(previous.version).set(0)
            elif previous is not None:
                try:
                    self.model_version.remove(previous.version)
                except KeyError:
                    pass
            self.model_version.labels(details['model'].version).set(1)
            self.model_loaded.set(details['model'].loaded_at)
            self.ready.set(1)
            self.reloads.inc()
        elif event in ('failed', 'poll_error'):
            self.reload_failures.inc()

    def exposition(self) -> bytes:
        """The Prometheus text of /metrics: this process's registry, or every worker's
        files added up."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        path = os.environ['PROMETHEUS_MULTIPROC_DIR']
        _forget_dead_workers(path)
        registry = CollectorRegistry()      # a fresh one per scrape, as the client requires
        shared_metrics.MultiProcessCollector(registry, path)
        return generate_latest(registry)


def _forget_dead_workers(path: str) -> None:
    """Removes the live gauges' files of processes that are gone (a worker that crashed,
    which the supervisor replaced): else its last version and ready values would count
    as a live worker's."""
    for name in glob.glob(os.path.join(path, 'gauge_live*_*.db')):
        pid = int(name[:-len('.db')].rsplit('_', 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                shared_metrics.mark_process_dead(pid, path)
            except FileNotFoundError:   # another worker's scrape was first
                pass
        except PermissionError:         # alive, another user's (a reused pid)
            pass


# ---- the guard: limits, API key, metrics, as plain ASGI (cheap per request) -----------

async def _reply(send, status: int, detail: str, headers: list | None = None) -> None:
    body = JSONResponse({'detail': detail}).body
    await send({'type': 'http.response.start', 'status': status,
                'headers': [(b'content-type', b'application/json'),
                            (b'content-length', str(len(body)).encode())] + (headers or [])})
    await send({'type': 'http.response.body', 'body': body})


class Guard:
    """In front of the whole app (ServeApp): query-string and body size limits, the API
    key, the request counter and latency histogram of every response, and the
    shortcuts: a GET route's fast answer to its plain requests (the route answers the
    rest, and every error)."""

    def __init__(self, app, metrics: ServeMetrics, limits: Limits, api_key: str | None,
                 shortcuts: dict | None = None):
        self.app, self.metrics, self.limits = app, metrics, limits
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        # GET path -> async fn(scope) -> Response, or None to let the app answer.
        self.shortcuts = {} if shortcuts is None else shortcuts
        self.shortcut_answers = 0     # how many requests a shortcut answered (tests)
        self._series: dict[tuple[str, str, int], tuple] = {}

    def _authorized(self, scope) -> bool:
        got = b''
        for name, value in scope['headers']:
            if name == b'x-api-key':
                got = value
                break
        # Equal-length digests compared in constant time: neither the key nor its
        # length leaks through timing.
        return hmac.compare_digest(hashlib.sha256(got).digest(), self.key_digest)

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope['path']
        status = [500]

        async def send_status(message):
            if message['type'] == 'http.response.start':
                status[0] = message['status']
            await send(message)

        try:
            await self._handle(scope, receive, send_status, path)
        finally:
            key = (path if path in ROUTES else 'other', scope['method'], status[0])
            series = self._series.get(key)
            if series is None:
                series = self._series_of(key)
            series[0].inc()
            series[1].observe(time.perf_counter() - start)

    def _series_of(self, key: tuple[str, str, int]) -> tuple:
        """The request counter and latency histogram children of (endpoint, method,
        status), looked up once (a label lookup per request is measurable)."""
        endpoint, method, status = key
        if len(self._series) > 10_000:   # unbounded methods: keep the memory bounded
            self._series.clear()
        series = self._series[key] = (
            self.metrics.requests.labels(endpoint, method, str(status)),
            self.metrics.latency.labels(endpoint, str(status)))
        return series

    async def _handle(self, scope, receive, send, path):
        limits = self.limits
        if len(scope['query_string']) > limits.max_query_bytes:
            return await _reply(send, 414, f'query string longer than {limits.max_query_bytes} '
                                'bytes; send long lists in a POST body')
        if self.key_digest is not None and path not in OPEN_PATHS and \
                not self._authorized(scope):
            return await _reply(send, 401, f'missing or wrong API key (header {API_KEY_HEADER})')
        if scope['method'] in ('GET', 'HEAD', 'OPTIONS', 'DELETE'):
            shortcut = self.shortcuts.get(path) if scope['method'] == 'GET' else None
            if shortcut is not None:
                try:
                    response = await shortcut(scope)
                except Exception:    # noqa: BLE001 - the route answers, and reports it
                    response = None
                if response is not None:
                    self.shortcut_answers += 1
                    return await response(scope, receive, send)
            return await self.app(scope, receive, send)
        # A body is read here, whole and bounded, then handed on.
        for name, value in scope['headers']:
            if name == b'content-length':
                try:
                    too_big = int(value) > limits.max_body_bytes
                except ValueError:
                    return await _reply(send, 400, 'invalid Content-Length')
                if too_big:
                    return await _reply(send, 413, f'body larger than {limits.max_body_bytes} '
                                        'bytes')
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message['type'] != 'http.request':   # the client went away
                return
            chunk = message.get('body', b'')
            size += len(chunk)
            if size > limits.max_body_bytes:
                return await _reply(send, 413, f'body larger than {limits.max_body_bytes} bytes')
            chunks.append(chunk)
            more = message.get('more_body', False)
        body = b''.join(chunks)
        sent = [False]

        async def replay():
            if not sent[0]:
                sent[0] = True
                return {'type': 'http.request', 'body': body, 'more_body': False}
            return await receive()
        return await self.app(scope, replay, send)


class ServeApp(FastAPI):
    """FastAPI with the Guard in front of all of it, FastAPI's own middleware included
    (a request that a shortcut answers costs half the CPU that way)."""
    guard: Guard | None = None

    async def __call__(self, scope, receive, send) -> None:
        if self.guard is not None and scope['type'] == 'http':
            return await self.guard(scope, receive, send)
        return await super().__call__(scope, receive, send)

    async def behind_guard(self, scope, receive, send) -> None:
        """The app without the guard (what the guard hands requests on to)."""
        return await super().__call__(scope, receive, send)


# ---- request and response bodies (their limits are the server's options) -------------

class Ok(BaseModel):
    status: str
    model_version: str | None = None
    detail: str | None = None


class ErrorBody(BaseModel):
    detail: str | list[dict[str, Any]]


class ScoredItem(BaseModel):
    item: str
    score: float | None = Field(description='null only if not finite (never for a verified '
                                'model)')


class Gate(BaseModel):
    passed: bool | None
    metric: str | None
    max_regression: float | None
    reason: str | None


class CompatResponse(BaseModel):
    articles: list[str]


def _models(limits: Limits):
    """The pydantic models whose limits come from the server's options."""
    Id = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_id_length,
                                          pattern=r'^[^\x00]+$')]
    IdList = Annotated[list[Id], Field(max_length=limits.max_list)]
    K = Annotated[int, Field(ge=1, le=limits.max_k)]

    class RecommendResponse(BaseModel):
        user: str
        model_version: str
        items: list[ScoredItem]
        ignored: list[str] = Field(description='allow/block IDs not in the model')

    class BatchRequest(BaseModel):
        model_config = ConfigDict(extra='forbid')
        users: Annotated[list[Id], Field(min_length=1, max_length=limits.max_batch)]
        k: K = 10
        exclude_seen: bool = True
        allow: IdList | None = None
        block: IdList = []

    class BatchResult(BaseModel):
        user: str
        items: list[ScoredItem] | None = Field(description='null if the user is unknown')
        error: str | None = None

    class BatchResponse(BaseModel):
        model_version: str
        results: list[BatchResult]
        ignored: list[str]

    class SimilarResponse(BaseModel):
        item: str
        model_version: str
        items: list[ScoredItem]

    class Rating(BaseModel):
        model_config = ConfigDict(extra='forbid')
        item: Id
        value: float = Field(ge=-MAX_VALUE, le=MAX_VALUE, allow_inf_nan=False)

    class FoldInRequest(BaseModel):
        model_config = ConfigDict(extra='forbid')
        ratings: Annotated[list[Rating], Field(min_length=1, max_length=limits.max_list)]
        k: K = 10
        exclude_rated: bool = True
        on_unknown: Literal['raise', 'skip'] = 'raise'
        allow: IdList | None = None
        block: IdList = []

    class FoldInResponse(BaseModel):
        model_version: str
        items: list[ScoredItem]
        ignored: list[str] = Field(description='unknown rated items (on_unknown "skip") '
                                   'and allow/block IDs not in the model')

    class ModelInfo(BaseModel):
        version: str
        path: str
        model: str
        trained_at: str | None
        run_id: str | None
        loaded_at: str
        latent_factors: int
        users: int
        items: int
        seen_pairs: int
        metrics: dict[str, float | int | None]
        gate: Gate | None = Field(description="the promotion gate's verdict (report.json)")

    return dict(Id=Id, IdList=IdList, K=K, RecommendResponse=RecommendResponse,
                BatchRequest=BatchRequest, BatchResponse=BatchResponse,
                SimilarResponse=SimilarResponse, FoldInRequest=FoldInRequest,
                FoldInResponse=FoldInResponse, ModelInfo=ModelInfo)


# ---- helpers -----------------------------------------------------------------------------

def _score(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _items(model: ServedModel, result) -> list[dict]:
    items = model.rec.items
    return [{'item': str(items[j]), 'score': _score(s)} for j, s in result]


def _rows(vocab: np.ndarray, ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """(sorted unique rows of the IDs found, IDs not in the vocabulary)."""
    if not ids:
        return np.zeros(0, np.int64), []
    rows = lookup_known(vocab, np.array(ids, dtype=str))
    unknown = [i for i, r in zip(ids, rows.tolist()) if r < 0]
    return np.unique(rows[rows >= 0]), unknown


_PLAIN_BOOLS = {'true': True, 'false': False, '1': True, '0': False}
_PLAIN_K = re.compile(r'[1-9][0-9]{0,8}')


def _plain_params(query: bytes, names: frozenset[str]) -> dict[str, str] | None:
    """The query's parameters, read as the routes read them (Starlette's parse), if
    each is one of `names` and given once; else None."""
    got: dict[str, str] = {}
    for name, value in parse_qsl(query.decode('latin-1'), keep_blank_values=True):
        if name in got or name not in names:
            return None
        got[name] = value
    return got


def _plain_id(value: str | None, limits: Limits) -> bool:
    """An ID every route accepts as it is: 1 to max_id_length printable characters."""
    return value is not None and 0 < len(value) <= limits.max_id_length and \
        value.isprintable()


def _plain_k(value: str, limits: Limits) -> int | None:
    """A plain number in [1, max_k] (no sign, spaces, leading zeros or underscores)."""
    return int(value) if _PLAIN_K.fullmatch(value) and int(value) <= limits.max_k else None


def plain_recommend_query(query: bytes, limits: Limits) -> tuple[str, int, bool] | None:
    """(user, k, exclude_seen) of a GET /recommend query string that the route's
    validation accepts as it is, read as the route reads it; None for anything else
    (other or repeated parameters, values the route must check)."""
    got = _plain_params(query, frozenset({'user', 'k', 'exclude_seen'}))
    if got is None or not _plain_id(got.get('user'), limits):
        return None
    k = _plain_k(got.get('k', '10'), limits)
    exclude_seen = _PLAIN_BOOLS.get(got.get('exclude_seen', 'true'))
    if k is None or exclude_seen is None:
        return None
    return got['user'], k, exclude_seen


def plain_compat_query(query: bytes, limits: Limits) -> tuple[str, int] | None:
    """(userId, numRecs) of a GET /recommendation query string that the route accepts
    as it is; None for anything else."""
    got = _plain_params(query, frozenset({'userId', 'numRecs'}))
    if got is None or not _plain_id(got.get('userId'), limits):
        return None
    k = _plain_k(got.get('numRecs', str(limits.compat_default_k)), limits)
    return None if k is None else (got['userId'], k)


def _json(content: dict, model: ServedModel, status: int = 200) -> JSONResponse:
    return JSONResponse(content, status_code=status, headers={VERSION_HEADER: model.version})


# ---- the app -----------------------------------------------------------------------------

def create_app(holder: ModelHolder, limits: Limits = Limits(), api_key: str | None = None,
               metrics: ServeMetrics | None = None) -> FastAPI:
    """The ASGI app over a ModelHolder (already loaded, or polling a model root)."""
    metrics = metrics or ServeMetrics()
    if holder.current is not None:      # loaded before the app existed
        metrics.listener('loaded', model=holder.current)
    holder.listener = metrics.listener
    scorer = Scorer(on_batch=metrics.batch_rows.observe)
    M = _models(limits)
    Id, IdList, K = M['Id'], M['IdList'], M['K']

    @asynccontextmanager
    async def lifespan(_app):
        holder.start()
        try:
            yield
        finally:
            holder.stop()
            scorer.close()

    errors = {400: {'model': ErrorBody, 'description': 'Bad parameters (compatibility '
                                                      'routes)'},
              401: {'model': ErrorBody, 'description': 'Missing or wrong API key'},
              413: {'model': ErrorBody, 'description': 'Body too large'},
              414: {'model': ErrorBody, 'description': 'Query string too large'},
              422: {'model': ErrorBody, 'description': 'Invalid parameters or body'},
              503: {'model': ErrorBody, 'description': 'No model loaded yet'}}
    not_found = {404: {'model': ErrorBody, 'description': 'Unknown user or item'}}
    app = ServeApp(title='WALS recommendations', version='1', lifespan=lifespan,
                  docs_url=None, redoc_url=None, responses=errors,
                  description='Online recommendations from a published WALS model '
                              '(docs/serving.md).')
    app.state.holder, app.state.metrics, app.state.scorer = holder, metrics, scorer
    shortcuts: dict = {}     # filled below
    app.guard = Guard(app.behind_guard, metrics=metrics, limits=limits, api_key=api_key,
                      shortcuts=shortcuts)

    def model_or_503() -> ServedModel:
        model = holder.current
        if model is None:
            raise ApiError(503, holder.not_ready_reason)
        return model

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        headers = {VERSION_HEADER: e.version} if e.version else {}
        if e.status == 503:
            headers['Retry-After'] = '5'
        return JSONResponse({'detail': e.detail}, status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError):
        # The errors without the offending input echoed back (it may be megabytes).
        detail = [{'loc': list(err.get('loc', ())), 'msg': str(err.get('msg', '')),
                   'type': str(err.get('type', ''))} for err in e.errors()]
        return JSONResponse({'detail': detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        return JSONResponse({'detail': str(e.detail)}, status_code=e.status_code,
                            headers=getattr(e, 'headers', None))

    @app.exception_handler(Exception)
    async def crash(_request, e: Exception):
        log.exception('internal error')
        return JSONResponse({'detail': 'internal error (logged)'}, status_code=500)

    async def rank(model: ServedModel, user_rows: list[int], k: int, exclude_seen: bool,
                   allow: list[str] | None, block: list[str]):
        """Recommendations of known user rows, and the allow/block IDs not in the model."""
        rec = model.rec
        block_rows, unknown = _rows(rec.items, block)
        allow_rows = None
        if allow is not None:
            allow_rows, unknown_allow = _rows(rec.items, allow)
            unknown = unknown_allow + unknown
        jobs = []
        for i in user_rows:
            exclude = block_rows
            if exclude_seen:
                seen = rec.seen_indices[rec.seen_indptr[i]:rec.seen_indptr[i + 1]]
                exclude = np.concatenate([seen.astype(np.int64), block_rows]) \
                    if len(block_rows) else seen.astype(np.int64)
            jobs.append(RankJob(model, _stored_row(rec, i), k, exclude, allow_rows))
        return await scorer.run_many(jobs), unknown

    def user_row(model: ServedModel, user: str) -> int:
        try:
            return model.rec.user_index(user)
        except KeyError as e:
            raise ApiError(404, e.args[0], model.version) from None

    async def recommend_answer(model: ServedModel, user: str, i: int, k: int,
                               exclude_seen: bool, allow: list[str] | None,
                               block: list[str]) -> JSONResponse:
        (result,), unknown = await rank(model, [i], k, exclude_seen, allow, block)
        return _json({'user': user, 'model_version': model.version,
                      'items': _items(model, result), 'ignored': unknown}, model)

    @app.get('/recommend', response_model=M['RecommendResponse'], responses=not_found,
             summary='Top-k items for a known user')
    async def recommend(user: Annotated[Id, Query(description='User ID')],
                        k: Annotated[K, Query(description='How many items')] = 10,
                        exclude_seen: Annotated[bool, Query(
                            description="Leave out the user's items in the training input"
                        )] = True,
                        allow: Annotated[IdList | None, Query(
                            description='Only these items (repeat the parameter)')] = None,
                        block: Annotated[IdList, Query(
                            description='Never these items (repeat the parameter)')] = []):
        model = model_or_503()
        return await recommend_answer(model, user, user_row(model, user), k, exclude_seen,
                                      allow, block)

    def shortcut(parse, answer):
        """A GET route's shortcut: `parse(query string, limits)` -> (user ID, *more) of
        a plain request, or None; a known user's answer is `answer(model, user ID,
        user row, *more)`, the route's own (the same bytes). None (the route answers,
        errors included) for anything else. It skips FastAPI's routing and validation:
        most of such a request's CPU."""
        async def answer_plain(scope) -> JSONResponse | None:
            params = parse(scope['query_string'], limits)
            model = holder.current
            if params is None or model is None:
                return None
            try:
                i = model.rec.user_index(params[0])
            except KeyError:
                return None
            return await answer(model, params[0], i, *params[1:])
        return answer_plain

    shortcuts['/recommend'] = shortcut(
        plain_recommend_query,
        lambda model, user, i, k, exclude_seen: recommend_answer(model, user, i, k,
                                                                 exclude_seen, None, []))

    @app.post('/recommend', response_model=M['BatchResponse'],
              summary='Top-k items for each user of a batch')
    async def recommend_batch(body: Annotated[M['BatchRequest'], Body()]):
        model = model_or_503()
        rows = lookup_known(model.rec.users, np.array(body.users, dtype=str)).tolist()
        known = [r for r in rows if r >= 0]
        results, unknown = await rank(model, known, body.k, body.exclude_seen, body.allow,
                                      body.block)
        it = iter(results)
        out = []
        for user, r in zip(body.users, rows):
            if r < 0:
                out.append({'user': user, 'items': None,
                            'error': f'user ID {user!r} is not in the model'})
            else:
                out.append({'user': user, 'items': _items(model, next(it)), 'error': None})
        return _json({'model_version': model.version, 'results': out, 'ignored': unknown},
                     model)

    @app.get('/similar', response_model=M['SimilarResponse'], responses=not_found,
             summary='The k items most cosine-similar to an item')
    async def similar(item: Annotated[Id, Query(description='Item ID')],
                      k: Annotated[K, Query(description='How many items')] = 10):
        model = model_or_503()
        try:
            j = model.rec.item_index(item)
        except KeyError as e:
            raise ApiError(404, e.args[0], model.version) from None
        result = await scorer.run(SimilarJob(model, j, k))
        return _json({'item': item, 'model_version': model.version,
                      'items': _items(model, result)}, model)

    @app.post('/fold_in', response_model=M['FoldInResponse'], responses=not_found,
              summary="Recommendations for a new user from their ratings (the model is not "
                      "changed)")
    async def fold_in(body: Annotated[M['FoldInRequest'], Body()]):
        model = model_or_503()
        rec = model.rec
        ids = [r.item for r in body.ratings]
        rows = lookup_known(rec.items, np.array(ids, dtype=str))
        unknown = [i for i, r in zip(ids, rows.tolist()) if r < 0]
        if unknown and body.on_unknown == 'raise':
            shown = ', '.join(repr(u) for u in unknown[:10])
            raise ApiError(404, f'{len(unknown)} rated item(s) are not in the model: {shown}'
                           '; on_unknown "skip" leaves them out', model.version)
        pairs = [(ids[n], r.value) for n, r in enumerate(body.ratings) if rows[n] >= 0]
        if not pairs:
            raise ApiError(422, 'none of the rated items is in the model', model.version)

        def solve():
            return rec.fold_in(pairs)
        try:
            stored = await scorer.run(CallJob(solve))
        except ValueError as e:      # non-finite factors from extreme values
            raise ApiError(422, str(e), model.version) from None
        block_rows, unknown_lists = _rows(rec.items, body.block)
        exclude = np.unique(rows[rows >= 0]) if body.exclude_rated else np.zeros(0, np.int64)
        exclude = np.concatenate([exclude, block_rows])
        allow_rows = None
        if body.allow is not None:
            allow_rows, unknown_allow = _rows(rec.items, body.allow)
            unknown_lists = unknown_allow + unknown_lists
        result = await scorer.run(RankJob(model, stored, body.k, exclude, allow_rows))
        return _json({'model_version': model.version, 'items': _items(model, result),
                      'ignored': unknown + unknown_lists}, model)

    @app.get('/model', response_model=M['ModelInfo'], summary='The model being served')
    async def model_info():
        model = model_or_503()
        return _json(model.info, model)

    @app.get('/healthz', response_model=Ok, summary='The process is alive')
    async def healthz():
        return JSONResponse({'status': 'ok'})

    @app.get('/readyz', response_model=Ok, summary='A verified model is loaded (503 if not)')
    async def readyz():
        model = holder.current
        if model is None:
            return JSONResponse({'status': 'not ready', 'detail': holder.not_ready_reason},
                                status_code=503, headers={'Retry-After': '5'})
        return _json({'status': 'ready', 'model_version': model.version}, model)

    @app.get('/metrics', summary='Prometheus metrics',
             responses={200: {'content': {CONTENT_TYPE_LATEST: {'schema': {'type': 'string'}}},
                              'description': 'Prometheus text format'}})
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    # ---- compatibility with the original App Engine app ------------------------------

    @app.get('/recommendation', response_model=CompatResponse, responses=not_found,
             summary='Compatibility: the original app\'s route (IDs as strings, best first)')
    async def recommendation(userId: Annotated[str | None, Query(  # noqa: N803 (its name)
                                 max_length=limits.max_id_length)] = None,
                             numRecs: Annotated[str | None, Query(  # noqa: N803
                                 max_length=32)] = None):
        if userId is None:
            raise ApiError(400, 'No User Id provided.')
        k = limits.compat_default_k
        if numRecs is not None:
            try:
                k = int(numRecs)
            except ValueError:
                raise ApiError(400, 'numRecs must be an integer.') from None
            if not 1 <= k <= limits.max_k:
                raise ApiError(400, f'numRecs must be in [1, {limits.max_k}].')
        if not userId or '\x00' in userId:
            raise ApiError(400, 'userId must be a non-empty ID.')
        model = model_or_503()
        return await compat_answer(model, userId, user_row(model, userId), k)

    async def compat_answer(model: ServedModel, _user: str, i: int, k: int) -> JSONResponse:
        (result,), _ = await rank(model, [i], k, True, None, [])
        items = model.rec.items
        return _json({'articles': [str(items[j]) for j, _ in result]}, model)

    shortcuts['/recommendation'] = shortcut(plain_compat_query, compat_answer)

    @app.get('/readiness_check', response_model=Ok,
             summary='Compatibility: the original app\'s readiness route (503 if not ready)')
    async def readiness_check():
        return await readyz()

    return app


def _stored_row(rec, i: int) -> np.ndarray:
    """User row i as the trainer stores it (k factors, + the bias for explicit)."""
    if rec.explicit:
        return np.append(rec.row[i], np.float32(rec.row_bias[i]))
    return rec.row[i]

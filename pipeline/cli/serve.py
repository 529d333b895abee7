"""python -m pipeline.serve (wals serve): the recommendation server's command line.

    python -m pipeline.serve --model_root ROOT        # follows ROOT/LATEST (local or gs://)
    python -m pipeline.serve --model DIR              # one fixed model
    python -m pipeline.serve --model_root ROOT --workers 2   # two processes, one port

Exit codes: 0 after a clean shutdown (SIGINT/SIGTERM), 2 for bad options (including
a non-loopback --host without an API key), 1 when --model cannot be loaded, the
port cannot be bound or a worker cannot start. With --model_root the server starts
even before a version is promoted (or while LATEST names a broken one): /readyz
answers 503 until a verified version is loaded. docs/serving.md documents every option.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import ipaddress
import json
import logging
import os
import sys

from pipeline.cli.common import prog
from pipeline.serving.app import Limits, ServeMetrics, create_app
from pipeline.serving.model_holder import ModelHolder, load_model, one_line
from pipeline.serving.server import STARTUP_FAILURE, serve, serve_workers, stop_with_parent

API_KEY_ENV = 'WALS_SERVE_API_KEY'
MIN_KEY_LENGTH = 16
DEFAULTS = Limits()
MAX_WORKERS = 64
# --workers N > 1: the workers' settings (JSON, no secret: the API key stays in
# API_KEY_ENV), set by the parent for the app factory each worker calls.
SETTINGS_ENV = 'WALS_SERVE_SETTINGS'
WORKER_APP = 'pipeline.cli.serve:worker_app'
LOG_FORMAT = '%(asctime)s %(levelname)s %(name)s %(message)s'

log = logging.getLogger('pipeline.serving')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog('serve'),
        description='Serve recommendations over HTTP from a published model '
                    '(docs/serving.md).')
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--model_root', '--model-root', dest='model_root',
                        help='A model root (local or gs://): the version LATEST names is '
                             'served, and each newly promoted version is loaded, verified '
                             'and swapped in without a failed request.')
    source.add_argument('--model', help='One published model folder (local or gs://), '
                                        'served until the process stops.')
    p.add_argument('--host', default='127.0.0.1',
                   help='Address to bind. Default: 127.0.0.1. Any address other than a '
                        f'loopback one needs an API key ({API_KEY_ENV} or --api_key_file).')
    p.add_argument('--port', type=int, default=int(os.environ.get('PORT') or 8080),
                   help='Port to bind. Default: $PORT if set (Cloud Run sets it), else 8080.')
    p.add_argument('--poll_interval', '--poll-interval', dest='poll_interval', type=float,
                   default=30.0,
                   help='--model_root: seconds between reads of LATEST. Default: 30.')
    p.add_argument('--workers', type=int, default=1,
                   help='Server processes sharing the port, each loading (and, with '
                        '--model_root, following) the model itself: about one per core. '
                        f'1 to {MAX_WORKERS}. Default: 1.')
    p.add_argument('--api_key_file', '--api-key-file', dest='api_key_file',
                   help=f'File holding the API key (else the {API_KEY_ENV} environment '
                        'variable; never on the command line). With a key, every request '
                        'but /healthz, /readyz and /readiness_check must send it in the '
                        f'X-API-Key header. At least {MIN_KEY_LENGTH} characters.')
    limits = p.add_argument_group('limits (requests over them get 4xx answers)')
    limits.add_argument('--max_k', '--max-k', dest='max_k', type=int, default=DEFAULTS.max_k,
                        help=f'Largest k (and numRecs). Default: {DEFAULTS.max_k}.')
    limits.add_argument('--max_batch', '--max-batch', dest='max_batch', type=int,
                        default=DEFAULTS.max_batch,
                        help=f'Most users in one POST /recommend. Default: {DEFAULTS.max_batch}.')
    limits.add_argument('--max_list', '--max-list', dest='max_list', type=int,
                        default=DEFAULTS.max_list,
                        help='Most IDs in an allow or block list, and most ratings in one '
                             f'POST /fold_in. Default: {DEFAULTS.max_list}.')
    limits.add_argument('--max_id_length', '--max-id-length', dest='max_id_length', type=int,
                        default=DEFAULTS.max_id_length,
                        help=f'Longest user or item ID. Default: {DEFAULTS.max_id_length} '
                             '(the trainer\'s).')
    limits.add_argument('--max_body_bytes', '--max-body-bytes', dest='max_body_bytes',
                        type=int, default=DEFAULTS.max_body_bytes,
                        help=f'Largest request body. Default: {DEFAULTS.max_body_bytes} (1 MiB).')
    p.add_argument('--log_level', '--log-level', dest='log_level', default='info',
                   choices=('debug', 'info', 'warning', 'error'),
                   help='Default: info.')
    p.add_argument('--access_log', '--access-log', dest='access_log', action='store_true',
                   help='Log every request (off by default: /metrics counts them).')
    return p


def _is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a host name: it may resolve to anything


def read_api_key(parser: argparse.ArgumentParser, args) -> str | None:
    """The API key from --api_key_file or the environment (parser.error if unusable)."""
    key = None
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding='utf-8') as f:
                key = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f'--api_key_file {args.api_key_file}: {e}')
        if not key:
            parser.error(f'--api_key_file {args.api_key_file} is empty')
    elif os.environ.get(API_KEY_ENV):
        key = os.environ[API_KEY_ENV].strip()
    if key is not None:
        if len(key) < MIN_KEY_LENGTH:
            parser.error(f'the API key must be at least {MIN_KEY_LENGTH} characters')
        if not key.isprintable() or not key.isascii():
            parser.error('the API key must be printable ASCII (it travels in a header)')
    if key is None and not _is_loopback(args.host):
        parser.error(f'--host {args.host} is not a loopback address: set an API key '
                     f'({API_KEY_ENV} or --api_key_file) or bind 127.0.0.1')
    return key


def check_args(parser: argparse.ArgumentParser, args) -> Limits:
    for name in ('max_k', 'max_batch', 'max_list', 'max_id_length', 'max_body_bytes'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1')
    if not 0 < args.port < 65536:
        parser.error('--port must be in [1, 65535]')
    if args.poll_interval <= 0:
        parser.error('--poll_interval must be positive')
    if not 1 <= args.workers <= MAX_WORKERS:
        parser.error(f'--workers must be in [1, {MAX_WORKERS}]')
    return Limits(max_k=args.max_k, max_batch=args.max_batch, max_list=args.max_list,
                  max_id_length=args.max_id_length, max_body_bytes=args.max_body_bytes)


def open_holder(model: str | None, model_root: str | None, poll_interval: float
                ) -> ModelHolder:
    """The model source, ready to serve: --model loaded and verified (errors
    propagate), or --model_root's LATEST read once."""
    holder = ModelHolder(model=model, model_root=model_root, poll_interval=poll_interval)
    if model:
        holder.load_fixed()
    else:
        holder.poll_once()
        if holder.current is None:
            log.warning('not ready yet: %s; polling every %g s', holder.not_ready_reason,
                        poll_interval)
    return holder


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    limits = check_args(parser, args)
    api_key = read_api_key(parser, args)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    if args.workers > 1:
        return serve_many(args, limits, api_key)
    try:
        holder = open_holder(args.model, args.model_root, args.poll_interval)
    except Exception as e:   # noqa: BLE001 - one clear line, no traceback
        print(f'error: --model {args.model}: {one_line(e)}', file=sys.stderr)
        return 1
    app = create_app(holder, limits, api_key)

    return serve(app, args.host, args.port, args.log_level, args.access_log)


def serve_many(args, limits: Limits, api_key: str | None) -> int:
    """--workers N > 1: N processes of worker_app on one port (serve_workers)."""
    model = args.model
    if model:
        # Checked here first, so that a bad --model fails as with one process (one
        # line, exit 1) before anything is bound. The workers then load the folder
        # found here: with a model root given as --model, all serve the same version.
        try:
            model = load_model(model).path
        except Exception as e:   # noqa: BLE001 - one clear line, no traceback
            print(f'error: --model {args.model}: {one_line(e)}', file=sys.stderr)
            return 1
        gc.collect()             # this process's copy, before N workers load theirs
    settings = {'model': model, 'model_root': args.model_root,
                'poll_interval': args.poll_interval, 'limits': dataclasses.asdict(limits),
                'log_level': args.log_level, 'api_key': api_key is not None,
                'supervisor': os.getpid()}
    os.environ[SETTINGS_ENV] = json.dumps(settings)
    if api_key is not None:
        # Inherited by the workers (spawned with this environment), never on a command
        # line: a key from --api_key_file reaches them the same way.
        os.environ[API_KEY_ENV] = api_key
    return serve_workers(WORKER_APP, args.workers, args.host, args.port, args.log_level,
                         args.access_log)


def worker_app():
    """The app (create_app's) of one worker process of --workers N: uvicorn calls it
    in each worker, which loads, verifies and polls its model itself. (Not annotated
    FastAPI: only pipeline/serving/ imports the serve extra's packages.)"""
    settings = json.loads(os.environ[SETTINGS_ENV])
    stop_with_parent(settings['supervisor'])
    logging.basicConfig(level=settings['log_level'].upper(), format=LOG_FORMAT)
    try:
        holder = open_holder(settings['model'], settings['model_root'],
                             settings['poll_interval'])
    except Exception as e:   # noqa: BLE001 - one clear line, no traceback
        print(f'error: --model {settings["model"]}: {one_line(e)}', file=sys.stderr)
        sys.exit(STARTUP_FAILURE)    # the supervisor stops instead of starting it again
    api_key = os.environ[API_KEY_ENV] if settings['api_key'] else None
    app = create_app(holder, Limits(**settings['limits']), api_key,
                     ServeMetrics(multiprocess=True))
    gc.collect()                     # as serve() does for one process
    gc.freeze()
    return app


if __name__ == '__main__':
    sys.exit(main())

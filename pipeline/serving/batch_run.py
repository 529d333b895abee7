"""One batch recommendation run, as `python -m pipeline.recommend --output` starts it:
verify the model, pick the users (or items), run the graph (pipeline/serving/batch.py)
on the chosen runner into a staging folder and publish the shards with a manifest."""
from __future__ import annotations

import json
import logging
import time

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.io.id_lists import read_id_file, select
from pipeline.options import ConfigError
from pipeline.runners.factory import make_pipeline
from pipeline.serving import batch as rb
from pipeline.store.files import save_json, save_npy
from pipeline.store.model_files import load_model_files, resolve_model_path
from pipeline.store.model_root import hold_model, release_holds
from pipeline.store.output_guard import OutputGuard
from pipeline.store.publish import UntrustedModel, discard, new_run_id, remove_tree

log = logging.getLogger(__name__)


def output_guard(args) -> OutputGuard:
    """The guard of a batch run's --output (pipeline/store/output_guard.py)."""
    return OutputGuard(args.output, 'similar_items' if args.similar_items
                       else 'recommendations', overwrite=args.overwrite)


def prepare(args, *, verify: bool = True, run_id: str | None = None):
    """Checks a batch command line and (with verify) the output and the model:
    returns (ModelFiles, SHA-256 of its _SUCCESS), or (None, None) without verify
    (a Dataflow dry run: no file is read). With run_id, a version of a model root
    is held by this run's lease until release_holds(run_id)."""
    if not args.output:
        raise ConfigError('--output is required for batch recommendations '
                          '(or give --user / --new_user_ratings)')
    if args.items_file and not args.similar_items:
        raise ConfigError('--items goes with --similar_items (use --users for users)')
    if args.users_file and args.similar_items:
        raise ConfigError('--users does not go with --similar_items (use --items)')
    guard = output_guard(args)
    reads = [('--model', args.model), ('--users', args.users_file),
             ('--items', args.items_file)]
    guard.check_reads(reads)
    files = sha = None
    if verify:
        guard.check_target()
        folder = hold_model(args.model, run_id) if run_id else resolve_model_path(args.model)
        guard.check_reads([('--model', folder)])
        sha, data = rb.manifest_sha256(folder)
        files = load_model_files(folder)
        if json.loads(data) != files.manifest:
            raise UntrustedModel(f'{folder}/_SUCCESS changed while it was read')
    return files, sha


def run_batch(args, options: PipelineOptions) -> dict:
    """Verifies the model, runs the pipeline into a staging folder and publishes the
    shards to args.output. Returns the metrics."""
    started = time.time()
    run_id = new_run_id()
    try:
        return _run_batch(args, options, started, run_id)
    finally:
        release_holds(run_id)


def _run_batch(args, options: PipelineOptions, started: float, run_id: str) -> dict:
    files, sha = prepare(args, run_id=run_id)
    selection = unknown = None
    duplicates = 0
    side = 'items' if args.similar_items else 'users'
    id_file = args.items_file if args.similar_items else args.users_file
    if id_file:
        requested = read_id_file(id_file, '--items' if args.similar_items else '--users')
        selection, unknown, duplicates = select(getattr(files, side), requested)
    output = args.output.rstrip('/')
    guard = output_guard(args)
    staging = guard.start(run_id)
    spec = rb.BatchSpec(model=files.path, manifest_sha256=sha, staging=staging,
                        similar=args.similar_items, top_k=args.top_k,
                        include_seen=args.include_seen, fmt=args.fmt,
                        selected=selection is not None, kernel_threads=args.kernel_threads)
    rb.remember_model(files, sha)
    try:
        if selection is not None:
            save_npy(f'{staging}/{rb.SELECTION}', selection)
            with FileSystems.create(
                    f'{staging}/errors/unknown_{side}-00000-of-00001.txt') as f:
                f.write(''.join(f'{s}\n' for s in unknown).encode('utf-8'))
        pipeline = make_pipeline(options)
        rb.build_pipeline(pipeline, spec)
        built = time.time()
        log.info('%s: top %d from %s (%d users x %d items, %s model); staging in %s',
                 spec.kind, args.top_k, files.path, len(files.users), len(files.items),
                 files.params.model, staging)
        pipeline.run().wait_until_finish()
        finished = time.time()
        with FileSystems.open(f'{staging}/{rb.STATS}') as f:
            stats = json.loads(f.read())
        remove_tree(f'{staging}/{rb.WORK_DIR}')
        counts = {'shards': stats['shards'], side: stats['rows'],
                  'short_lists': stats['short_lists']}
        if selection is not None:
            counts.update({f'requested_{side}': len(selection) + len(unknown) + duplicates,
                           f'unknown_{side}': len(unknown), f'duplicate_{side}': duplicates})
        metrics = {
            'kind': spec.kind, 'model': files.path, 'model_run_id':
                files.manifest.get('run_id'), 'model_type': files.params.model,
            'top_k': args.top_k, 'include_seen': args.include_seen, 'format': args.fmt,
            'counts': counts,
            'phase_seconds': {'load_model': round(built - started, 3),
                              'pipeline': round(finished - built, 3),
                              'shard_work': stats['seconds'],
                              'total': round(time.time() - started, 3)},
        }
        save_json(f'{staging}/metrics.json', metrics)
        guard.publish(staging, {
            'kind': spec.kind, 'run_id': run_id,
            'inputs': [{'model': files.path, 'manifest_sha256': sha,
                        'model_run_id': files.manifest.get('run_id')}]
            + ([{'path': id_file}] if id_file else []),
            'parameters': {'top_k': args.top_k, 'include_seen': args.include_seen,
                           'format': args.fmt, 'similar_items': args.similar_items},
            'counts': counts})
    except BaseException:
        discard(staging)
        raise
    finally:
        guard.close()
    log.info('Published %s to %s', spec.kind, output)
    return metrics

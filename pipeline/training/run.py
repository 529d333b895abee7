"""One training run, start to finish, as the command line and the Dataflow launcher
start it: check the inputs and the previous model, build the graph on the chosen
runner, run it into a staging folder, write the report, publish the model (to
--output, or a new version of --model_root) and let the gate decide whether LATEST
moves. The graph itself is pipeline/training/graph.py.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.errors import ModelCheckError
from pipeline.io.read import check_input_files
from pipeline.options import ConfigError, TrainConfig
from pipeline.runners.factory import make_pipeline
from pipeline.store.files import save_json
from pipeline.store.model_files import LATEST, PreviousModel, load_model_files, resolve_model_path
from pipeline.store.model_root import (hold_model, promote, prune, read_latest, release_holds,
                                       root_of, version_name, version_path)
from pipeline.store.output_guard import OutputGuard, relation
from pipeline.store.publish import (OutputExists, OutputRefused, PublishFailed,
                                    UntrustedModel, describe_inputs, discard, new_run_id,
                                    remove_tree, storage_errors)
from pipeline.store.model_check import check_saved_model
from pipeline.store.report import (PLOT, build_report, gate_decision, plot_convergence,
                                   write_report)
from pipeline.store.shared_storage import check_shared_paths
from pipeline.training.graph import build_pipeline
from pipeline.training.model_check import FACTS

log = logging.getLogger(__name__)

__all__ = ['COUNT_KEYS', 'OutputExists', 'OutputRefused', 'PLOT', 'check_inputs',
           'resolve_previous', 'run']


def check_inputs(pattern: str, flag: str = '--input') -> list[dict]:
    """The input files ([{path, size_bytes}]), or a ConfigError before any work
    starts: nothing matches, a directory, FIFO or device, a file that cannot be
    read, a compressed file that is not of its suffix's format
    (pipeline.io.read.check_input_files)."""
    check_input_files(pattern, flag)
    try:
        return describe_inputs(pattern)
    except Exception as e:   # noqa: BLE001 - the filesystem's own error says why
        raise ConfigError(f'cannot list {flag} {pattern}: {e}') from None


def resolve_previous(config: TrainConfig, run_id: str | None = None) -> PreviousModel | None:
    """--previous_model (a model folder, or a root's LATEST), or with --model_root its
    own LATEST; verified before any work. Its item factors seed this run when the
    mode and latent_factors match (else a ConfigError, unless --no_warm_start).
    With run_id, a version of a model root is held by this run's lease in that root
    (pipeline.store.model_root.hold_model) until the run ends: pruning leaves it."""
    path = config.previous_model
    if path is None and config.model_root:
        if not FileSystems.exists(f'{config.model_root.rstrip("/")}/{LATEST}'):
            return None       # the root's first version: nothing to start from
        path = config.model_root
    if path is None:
        return None
    try:
        folder = hold_model(path, run_id) if run_id else resolve_model_path(path)
        model = load_model_files(folder)
    except (UntrustedModel, OSError, KeyError, ValueError) as e:
        raise ConfigError(f'--previous_model {path}: {e}') from None
    p, q = config.params, model.params
    warm = not config.no_warm_start
    if warm and (q.model, q.latent_factors) != (p.model, p.latent_factors):
        raise ConfigError(
            f'cannot warm start from {folder}: it is --model {q.model} with '
            f'--latent_factors {q.latent_factors}, this run is --model {p.model} with '
            f'{p.latent_factors}; pass --no_warm_start to train from scratch and still '
            'compare with it')
    log.info('Previous model: %s (%s)', folder,
             'warm start of the item factors' if warm else 'compared only')
    return PreviousModel(folder, q, warm)


def run(config: TrainConfig, options: PipelineOptions, overwrite: bool = False) -> dict:
    """Builds and runs the pipeline into a staging folder, writes report.json and
    convergence.png there, then publishes the model with its _SUCCESS manifest: to
    config.output, or with --model_root to ROOT/versions/<version>/, and then points
    ROOT/LATEST at it when the gate passes. Returns the metrics (metrics.json) with
    two more keys: 'report' (report.json) and 'outcome' (published, promoted,
    message)."""
    started = time.time()
    config = check_shared_paths(config, options)
    inputs = check_inputs(config.input)
    if config.test_input:
        check_inputs(config.test_input, '--test_input')
    run_id = new_run_id()
    root = version = None
    if config.model_root:
        root, version = config.output.rstrip('/'), version_name(run_id)
        config = dataclasses.replace(config, output=version_path(root, version))
        overwrite = False          # a version is new by construction
    guard = OutputGuard(config.output, 'model', overwrite=overwrite, root=root,
                        flag='--model_root' if root else '--output')
    guard.check_target()
    # A --previous_model that is a model root (ROOT itself with --model_root ROOT, as
    # the daily DAG runs it) is compared by the version it resolves to, below.
    previous_path = config.previous_model
    if previous_path and (root_of(previous_path)[0] is not None or (
            root is not None and relation(previous_path, root) == 'is')):
        previous_path = None
    guard.check_reads([('--input', config.input), ('--test_input', config.test_input),
                       ('--previous_model', previous_path)],
                      allow_equal=('--previous_model',))
    staging = guard.start(run_id)
    try:
        previous = resolve_previous(config, run_id)
        if previous is not None:   # retraining in place (--overwrite onto it) is fine
            guard.check_reads([('--previous_model', previous.path)],
                              allow_equal=('--previous_model',))
        return _run(config, options, overwrite, started, inputs, run_id, root, version,
                    guard, staging, previous)
    finally:
        guard.close()
        release_holds(run_id)


def _run(config: TrainConfig, options: PipelineOptions, overwrite: bool, started: float,
         inputs: list[dict], run_id: str, root: str | None, version: str | None,
         guard: OutputGuard, staging: str, previous: PreviousModel | None) -> dict:
    pipeline = make_pipeline(options)
    work_dir = build_pipeline(pipeline, config, staging, previous)
    built = time.time()
    log.info('Training %d iterations of WALS on %s (%d file(s)); staging in %s',
             config.params.num_iters, config.input, len(inputs), staging)
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except BaseException:
        discard(staging)
        raise
    finished = time.time()
    path = f'{staging}/metrics.json'
    with FileSystems.open(path) as f:
        metrics = json.loads(f.read())
    facts = _model_check_facts(work_dir)
    metrics['exchange'] = exchange_summary(result, config, metrics)
    metrics['phase_seconds'].update(
        build_graph=round(built - started, 3),
        pipeline=round(finished - built, 3),
        total=round(finished - started, 3))
    save_json(path, metrics)
    remove_tree(work_dir)      # the saved rating blocks: not part of a model
    try:
        # The model check again, on the files about to be published (the pipeline
        # checked the factors against the training data before writing them).
        problems = check_saved_model(staging, config.params, facts, metrics)
        gate = gate_decision(metrics.get('comparison') if previous is not None else None,
                             config.gate_metric, config.max_regression, problems)
        if problems:
            raise ModelCheckError(f'the trained model failed its check in the gate, so '
                                  f'it was not published: {"; ".join(problems)}')
        previous_files = load_model_files(previous.path) if previous is not None else None
        report = build_report(metrics, staging, gate, previous_files, config.output, version)
        write_report(staging, report)
        plot_convergence(metrics.get('history', []), f'{staging}/{PLOT}',
                         f'--model {config.params.model}, k={config.params.latent_factors}')
    except BaseException:
        discard(staging)
        raise
    outcome = {'published': config.output, 'promoted': False, 'gate_passed': gate['passed']}
    if (not gate['passed'] and root is None and previous is not None
            and overwrite and previous.path.rstrip('/') == config.output.rstrip('/')):
        discard(staging)   # --overwrite would replace the very model the gate kept
        metrics.update(report=report, outcome=dict(
            outcome, published=None,
            message=f'Not published: {config.output} keeps the previous model.'))
        return metrics
    counts = {k: metrics[k] for k in COUNT_KEYS}
    try:   # checked again here: another run may have published since the start
        guard.publish(staging, {'run_id': run_id, 'inputs': inputs,
                                'parameters': config.describe(), 'counts': counts,
                                'lines': metrics['lines']})
    except BaseException:
        discard(staging)
        raise
    log.info('Published the model to %s', config.output)
    if root is None:
        outcome['message'] = f'Published to {config.output}.'
    elif gate['passed']:
        try:
            moved, latest = promote(root, version, metrics)
        except storage_errors() as e:
            raise PublishFailed(f'published {version}, but could not update {root}/{LATEST} '
                                f'({e}); LATEST is unchanged: run again to promote a new '
                                'version') from None
        outcome['promoted'] = moved
        if moved:
            outcome['message'] = f'Promoted: {root}/{LATEST} -> {version}.'
            if config.keep_versions:
                try:
                    pruned = prune(root, config.keep_versions, run_id)
                except Exception as e:   # noqa: BLE001 - promoted: cleanup is not the run
                    log.warning('Promoted %s, but pruning old versions of %s failed (%s); '
                                'the next run with --keep_versions prunes them.', version,
                                root, e)
                    pruned = []
                outcome['pruned'] = pruned
                if pruned:
                    outcome['message'] += f' Pruned {len(pruned)} old version(s).'
        else:
            outcome['message'] = (f'Published {version}, but {root}/{LATEST} already names '
                                  f'the newer version {latest["version"]}: not moved.')
    else:
        current = read_latest(root)
        outcome['message'] = (f'Kept the previous model: {root}/{LATEST} still names '
                              f'{current["version"] if current else "no version"}; the new '
                              f'model is published as {version}.')
    metrics.update(report=report, outcome=outcome)
    return metrics


def _model_check_facts(work_dir: str) -> dict | None:
    """What the pipeline's model check found (its facts file in the work folder),
    or None when the file is missing."""
    path = f'{work_dir}/{FACTS}'
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return json.loads(f.read())


def exchange_summary(result, config: TrainConfig, metrics: dict) -> dict:
    """metrics.json 'exchange': per half-step side, the most factor rows of the other
    side that one block solve held (the whole side when broadcast), and the factor
    rows this side's solves sent to the other side's blocks over the run (0 when
    broadcast), from the runner's metrics (None where the runner reports none)."""
    out = {'exchange': config.exchange, 'max_broadcast_mb': config.max_broadcast_mb}
    totals = {'row': metrics.get('items'), 'col': metrics.get('users')}
    for side, total in totals.items():
        held = None
        try:
            found = result.metrics().query(MetricsFilter().with_name(
                f'{side}_solve_other_rows'))['distributions']
            values = [d.committed or d.attempted for d in found]
            held = max((v.max for v in values if v is not None and v.count), default=None)
        except Exception:   # noqa: BLE001 - a runner without metrics support
            held = None
        routed = None
        try:
            found = result.metrics().query(MetricsFilter().with_name(
                f'{side}_rows_routed'))['counters']
            routed = sum((c.committed if c.committed is not None else c.attempted)
                         for c in found) if found else 0
        except Exception:   # noqa: BLE001
            routed = None
        out[f'{side}_solves'] = {'other_rows_held_max': held, 'other_rows': total,
                                 'own_rows_routed': routed}
    return out


COUNT_KEYS = ('users', 'items', 'train_ratings', 'test_ratings', 'test_cold_start_ratings',
              'duplicates_merged')

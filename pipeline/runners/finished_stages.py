"""Frees what Beam's FnApiRunner keeps of a stage once that stage has finished.

The FnApiRunner (the DirectRunner's in_memory and multi_processing modes) keeps,
until the pipeline ends:
- every side input, copied into its state once per consuming transform
  (execution.commit_side_inputs_to_state), and the side input's PCollection buffer;
- in_memory: every stage's cached BundleProcessor, holding the side inputs it
  decoded, until it has been idle 60-120 s (sdk_worker.BundleProcessorCache), and
  the worker's StateCache copies of them, bounded by a weight that Beam measures
  as ~0 for the trainer's factor blocks (so never evicted).
The trainer broadcasts new factors to the solves of every iteration, so memory grew
by every iteration's factors (about 0.2 GiB per iteration at 20M ratings, k=32).

install() wraps FnApiRunner._execute_bundle. After a bundle, when nothing for its
stage is queued any more (no deferred input or split residual, no timer, nothing
ready or waiting on the watermark), the stage will not run again: Beam schedules a
stage only once all of its inputs are complete. Then its side-input state entries
are deleted, a side input's buffer once no consuming transform is left; the
in-process worker's cached BundleProcessors for the stage are shut down (what Beam
does itself after the idle time) and its cached copies of the stage's side inputs
dropped (what the cache does to any entry it evicts). multi_processing workers are
separate processes: their processors still go after Beam's idle time.

A deleted state entry would read as an empty side input, not as an error: a bundle
for a stage already freed raises instead of running. The private names used are
checked by install(), so a Beam upgrade that moves them fails at once
(tests/test_finished_stages.py).
"""
from __future__ import annotations

import weakref

from pipeline.runners import beam_private

_RUNNER = 'apache_beam.runners.portability.fn_api_runner'
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    (f'{_RUNNER}.fn_runner', 'FnApiRunner._execute_bundle'),
    (f'{_RUNNER}.execution', 'FnApiRunnerExecutionContext.commit_side_inputs_to_state'),
    (f'{_RUNNER}.execution', '_ProcessingQueueManager.KeyedQueue'),
    (f'{_RUNNER}.worker_handlers', 'StateServicer.checkpoint'),
    (f'{_RUNNER}.worker_handlers', 'EmbeddedWorkerHandler'),
    ('apache_beam.runners.worker.sdk_worker', 'BundleProcessorCache.release'),
    ('apache_beam.runners.worker.sdk_worker', 'GlobalCachingStateHandler'),
    ('apache_beam.runners.worker.statecache', 'StateCache.invalidate'),
)

_SIDE_INPUT_STATE = frozenset(('iterable_side_input', 'multimap_side_input',
                               'multimap_keys_side_input',
                               'multimap_keys_values_side_input'))


class _Run:
    """One pipeline run: side-input buffer -> its consuming transforms not finished
    yet, and the stages whose side inputs are gone."""

    def __init__(self, ctx):
        self.readers: dict[bytes, set[str]] = {}
        for descriptors in ctx.side_input_descriptors_by_stage.values():
            for (transform_id, _), (buffer_id, _) in descriptors.items():
                self.readers.setdefault(buffer_id, set()).add(transform_id)
        self.freed: set[str] = set()


_installed = False
_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # execution context -> _Run


def _queued(ctx, stage_name: str) -> bool:
    """Whether the runner still holds input or timers for the stage."""
    q = ctx.queues
    if any(name == stage_name for name, _ in q.ready_inputs._q):
        return True
    return any(key[0] == stage_name
               for pending in (q.watermark_pending_inputs, q.time_pending_inputs)
               for key, _ in pending._q)


def _is_side_input_of(raw: bytes, transforms: set[str]) -> bool:
    from apache_beam.portability.api import beam_fn_api_pb2
    key = beam_fn_api_pb2.StateKey.FromString(raw)
    kind = key.WhichOneof('type')
    return kind in _SIDE_INPUT_STATE and getattr(key, kind).transform_id in transforms


def _drop_side_input_state(ctx, transforms: set[str]) -> None:
    """Deletes the runner's state entries of these transforms' side inputs."""
    servicer = ctx.worker_handler_manager.state_servicer
    with servicer._lock:
        state = servicer._state
        if not isinstance(state, dict):   # a checkpoint is open: leave it to Beam
            return
        for raw in [raw for raw in state if _is_side_input_of(raw, transforms)]:
            del state[raw]


def _free_in_process_worker(ctx, descriptor_id: str, transforms: set[str]) -> None:
    """Shuts down the in-process worker's idle BundleProcessors of one stage and
    drops its state-cache copies of the stage's side inputs. (Beam's StateCache is
    bounded by a weight it measures as ~0 for the trainer's factor blocks: without
    this it kept every iteration's decoded factors.)"""
    for handlers in list(ctx.worker_handler_manager._cached_handlers.values()):
        for handler in handlers:
            cache = getattr(handler, 'bundle_processor_cache', None)   # in-process only
            if cache is None:
                continue
            with cache._lock:
                idle = cache.cached_bundle_processors.pop(descriptor_id, [])
                cache.last_access_times.pop(descriptor_id, None)
            for processor in idle:
                processor.shutdown()
            state_cache = cache.state_handler_factory._state_handler._state_cache
            for key in list(state_cache._cache):
                if _is_side_input_of(key[0], transforms):
                    state_cache.invalidate(key)


def _free(ctx, run: _Run, stage, descriptor_id: str) -> None:
    transforms = {t.unique_name for t in stage.transforms}
    _free_in_process_worker(ctx, descriptor_id, transforms)
    if not any(transforms & left for left in run.readers.values()):
        return
    run.freed.add(stage.name)
    _drop_side_input_state(ctx, transforms)
    for buffer_id, left in run.readers.items():
        if left & transforms:
            left -= transforms
            if not left:
                ctx.pcoll_buffers.pop(buffer_id, None)


def install() -> None:
    """Wraps FnApiRunner._execute_bundle to free finished stages (idempotent).
    Raises RuntimeError naming every private Beam name that is gone."""
    missing = beam_private.missing_names(PRIVATE_NAMES)
    if missing:
        raise RuntimeError(f'{", ".join(missing)} gone: this Beam version needs a new look '
                           'at pipeline/runners/finished_stages.py')
    global _installed
    if _installed:
        return
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    original = fn_runner.FnApiRunner._execute_bundle

    def execute_bundle(self, ctx, bundle_context_manager, bundle_input):
        stage = bundle_context_manager.stage
        run = _RUNS.get(ctx)
        if run is None:
            run = _RUNS[ctx] = _Run(ctx)
        if stage.name in run.freed:
            raise RuntimeError(f'Beam scheduled stage {stage.name!r} again after it had '
                               'finished and its side inputs were freed: '
                               'pipeline/runners/finished_stages.py needs a new look')
        result = original(self, ctx, bundle_context_manager, bundle_input)
        if not _queued(ctx, stage.name):
            _free(ctx, run, stage, bundle_context_manager.process_bundle_descriptor.id)
        return result

    execute_bundle.__wrapped__ = original
    fn_runner.FnApiRunner._execute_bundle = execute_bundle
    _installed = True

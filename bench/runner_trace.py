"""Element accounting inside the FnApiRunner (the runner process of a DirectRunner run).

install(path) wraps, in this process only, the runner's side of the data plane:
every bundle a stage runs (BundleManager.process_bundle) records the elements it
sent to its worker per input, and the elements the runner stored from its outputs
(ListBuffer / GroupingBuffer appends). At exit the records are written to `path` as
JSON lines. Comparing what a stage's bundles stored with what the next stage's
bundles were sent says whether elements vanished in the runner's buffers or
between a worker and the runner. Nothing in the pipeline changes; the cost is one
decoding pass over the runner's buffered bytes (no user values are unpickled).

Used by bench/stress_multiprocessing.py --trace_runner.
"""
from __future__ import annotations

import atexit
import json
import threading

_local = threading.local()
_records: list = []
_lock = threading.Lock()


def _count(coder_impl, data: bytes) -> int:
    from apache_beam.coders.coder_impl import create_InputStream
    stream, n = create_InputStream(data), 0
    while stream.size() > 0:
        coder_impl.decode_from_stream(stream, True)
        n += 1
    return n


def install(path: str) -> None:
    from apache_beam.runners.portability.fn_api_runner import execution, fn_runner

    process_bundle = fn_runner.BundleManager.process_bundle
    list_append = execution.ListBuffer.append
    group_append = execution.GroupingBuffer.append

    def traced_process_bundle(self, inputs, expected_outputs, *args, **kwargs):
        ctx = self.bundle_context_manager
        record = {'stage': ctx.stage.name[:300], 'inputs': {}, 'outputs': {},
                  'thread': threading.get_ident()}
        for transform_id, elements in inputs.items():
            coder = ctx.get_input_coder_impl(transform_id)
            chunks = list(elements or [])
            record['inputs'][transform_id] = {
                'chunks': len(chunks), 'bytes': sum(len(c) for c in chunks),
                'elements': sum(_count(coder, c) for c in chunks)}
        _local.record = record
        try:
            result = process_bundle(self, inputs, expected_outputs, *args, **kwargs)
            record['error'] = result[0].error if result and result[0] else ''
            return result
        finally:
            _local.record = None
            with _lock:
                _records.append(record)

    def note(buffer_kind: str, data: bytes, elements: int) -> None:
        record = getattr(_local, 'record', None)
        key = buffer_kind
        target = record['outputs'] if record is not None else _orphans
        out = target.setdefault(key, {'messages': 0, 'bytes': 0, 'elements': 0})
        out['messages'] += 1
        out['bytes'] += len(data)
        out['elements'] += elements

    def traced_list_append(self, element: bytes) -> None:
        list_append(self, element)
        note(f'ListBuffer:{id(self)}', element, _count(self._coder_impl, element))

    def traced_group_append(self, elements_data: bytes) -> None:
        before = sum(len(v) for v in self._table.values())
        group_append(self, elements_data)
        note(f'GroupingBuffer:{id(self)}', elements_data,
             sum(len(v) for v in self._table.values()) - before)

    parallel = fn_runner.ParallelBundleManager.process_bundle

    def traced_parallel(self, inputs, *args, **kwargs):
        # Which runner buffers a stage's parts are cut from (ids as in the outputs).
        with _lock:
            _records.append({'stage': self.bundle_context_manager.stage.name[:300],
                             'sources': {name: f'{type(b).__name__}:{id(b)}'
                                         for name, b in inputs.items()}})
        return parallel(self, inputs, *args, **kwargs)

    fn_runner.BundleManager.process_bundle = traced_process_bundle
    fn_runner.ParallelBundleManager.process_bundle = traced_parallel
    execution.ListBuffer.append = traced_list_append
    execution.GroupingBuffer.append = traced_group_append

    def dump() -> None:
        with open(path, 'w') as f:
            for r in _records:
                f.write(json.dumps(r) + '\n')
            f.write(json.dumps({'orphans': _orphans}) + '\n')

    atexit.register(dump)


_orphans: dict = {}


def flatten_bundles(path: str) -> tuple[int, int]:
    """(bundles, bundles whose output differs from their input) among the bundles
    of stages that only move data ('(X/Read)+(Y/Write)', e.g. a Flatten before a
    GroupByKey): with no user code in them, any difference is the runner's."""
    import re
    checked = mismatched = 0
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if 'inputs' not in r or not re.fullmatch(r'\([^()]*/Read\)\+\([^()]*/Write\)',
                                                     r['stage']):
                continue
            sent = sum(v['elements'] for v in r['inputs'].values())
            stored = sum(v['elements'] for v in r['outputs'].values())
            checked += 1
            mismatched += sent != stored
    return checked, mismatched

"""Writing a trained model: model/*.npy, metrics.json (with phase_seconds, the wall
time per phase) and errors/bad_lines-*.jsonl, all under one folder."""
from __future__ import annotations

import io
import json
import time
from typing import TYPE_CHECKING

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsList, AsSingleton

from pipeline.errors import NumericalError
from pipeline.options import TrainConfig

if TYPE_CHECKING:
    from pipeline.train_graph import TrainedModel

MODEL_FILES = ('user.npy', 'item.npy', 'row.npy', 'col.npy')


def save_npy(path: str, array: np.ndarray) -> None:
    """np.save through Beam's FileSystems (local or gs://)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())


def save_json(path: str, obj: dict) -> None:
    with FileSystems.create(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode('utf-8'))


def phase_seconds(events: list[tuple[str, float]], now: float) -> dict:
    """Wall time per phase from the (name, wall clock) events of a run."""
    last: dict[str, float] = {}
    solve: dict[str, float] = {}
    for name, t in events:
        if name.startswith('solve_'):
            solve[name] = solve.get(name, 0.0) + t
        elif name == 'read_start':
            last[name] = min(last.get(name, t), t)
        else:
            last[name] = max(last.get(name, t), t)
    # By iteration number: as text, iteration_1000 would sort before iteration_999.
    iters = sorted((k for k in last if k.startswith('iteration_')), key=_iteration_number)
    out = {'read_and_group': last['blocks_built'] - last['read_start']}
    prev = last['blocks_built']
    per_iter = []
    for k in iters:
        per_iter.append(last[k] - prev)
        prev = last[k]
    out['iterations'] = prev - last['blocks_built']
    out['per_iteration'] = per_iter
    # Time inside the numpy solves (summed over blocks and workers): the rest of
    # per_iteration is the runner's overhead (side inputs, shuffles, scheduling).
    out['solve_per_iteration'] = [solve[k] for k in sorted(solve, key=_iteration_number)]
    out['evaluate_and_write'] = now - prev
    return {k: (round(v, 3) if isinstance(v, float) else [round(x, 3) for x in v])
            for k, v in out.items()}


def _iteration_number(name: str) -> int:
    return int(name.rsplit('_', 1)[1])


class _WriteOutputs(beam.DoFn):
    def __init__(self, config: TrainConfig, dest: str):
        self._config = config
        self._dest = dest.rstrip('/')

    def process(self, _, users, items, u, v, stats, reads, events):
        metrics = stats.summary()
        for name in ('train_rmse', 'test_rmse'):
            if metrics[name] is not None and not np.isfinite(metrics[name]):
                raise NumericalError(f'{name} is {metrics[name]}: training diverged')
        out = self._dest
        save_npy(f'{out}/model/user.npy', users.ids)
        save_npy(f'{out}/model/item.npy', items.ids)
        save_npy(f'{out}/model/row.npy', u.matrix)
        save_npy(f'{out}/model/col.npy', v.matrix)
        metrics.update({
            'users': len(users), 'items': len(items),
            'lines': reads.line_report(),
            'bad_line_examples': [reads.describe_bad(b) for b in reads.bad_examples],
            'parameters': self._config.describe(),
            'phase_seconds': phase_seconds(events, time.time()),
        })
        save_json(f'{out}/metrics.json', metrics)
        yield metrics


class WriteModel(beam.PTransform):
    """TrainedModel -> singleton metrics dict. Writes the model under `dest`:
    model/{user,item,row,col}.npy, metrics.json and errors/bad_lines-*.jsonl.
    Apply it to TrainWals' output: `model | WriteModel(config, dest)`."""

    def __init__(self, config: TrainConfig, dest: str):
        super().__init__()
        self._config = config
        self._dest = dest.rstrip('/')

    def expand(self, model: TrainedModel) -> beam.PCollection:
        _ = model.bad_lines | 'WriteBadLines' >> beam.io.WriteToText(
            f'{self._dest}/errors/bad_lines', file_name_suffix='.jsonl')
        return (model.users.pipeline | 'Once' >> beam.Create([None])
                | 'Write' >> beam.ParDo(
                    _WriteOutputs(self._config, self._dest), AsSingleton(model.users),
                    AsSingleton(model.items), AsSingleton(model.row_factors),
                    AsSingleton(model.col_factors), AsSingleton(model.stats),
                    AsSingleton(model.reads), AsList(model.timings)))

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
from wals_core import objectives

if TYPE_CHECKING:
    from pipeline.train_graph import TrainedModel

MODEL_FILES = ('user.npy', 'item.npy', 'row.npy', 'col.npy')
BIAS_FILES = ('row_bias.npy', 'col_bias.npy', 'global_mean.npy')   # explicit only


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
    iters = sorted(k for k in last if k.startswith('iteration_'))
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
    out['solve_per_iteration'] = [solve[k] for k in sorted(solve)]
    out['evaluate_and_write'] = now - prev
    return {k: (round(v, 3) if isinstance(v, float) else [round(x, 3) for x in v])
            for k, v in out.items()}


class _WriteOutputs(beam.DoFn):
    def __init__(self, config: TrainConfig, dest: str):
        self._config = config
        self._dest = dest.rstrip('/')

    def process(self, _, users, items, u, v, evaluation, reads, test_reads, ratings,
                cold_start, events):
        p = self._config.params
        metrics = evaluation.summary()
        for name in ('train_rmse', 'test_rmse'):
            if metrics[name] is not None and not np.isfinite(metrics[name]):
                raise NumericalError(f'{name} is {metrics[name]}: training diverged')
        metrics['test_cold_start_ratings'] += cold_start
        out = self._dest
        row, row_bias = objectives.split_bias(u.matrix, p)
        col, col_bias = objectives.split_bias(v.matrix, p)
        save_npy(f'{out}/model/user.npy', users.ids)
        save_npy(f'{out}/model/item.npy', items.ids)
        save_npy(f'{out}/model/row.npy', row)
        save_npy(f'{out}/model/col.npy', col)
        if row_bias is not None:
            # explicit: prediction = global_mean + row_bias[i] + col_bias[j] + row[i]·col[j]
            save_npy(f'{out}/model/row_bias.npy', row_bias)
            save_npy(f'{out}/model/col_bias.npy', col_bias)
            save_npy(f'{out}/model/global_mean.npy', np.float64(ratings.mean))
        metrics.update({
            'model': p.model,
            'users': len(users), 'items': len(items),
            'lines': reads.line_report(),
            'bad_line_examples': [reads.describe_bad(b) for b in reads.bad_examples],
            'parameters': self._config.describe(),
            'phase_seconds': phase_seconds(events, time.time()),
        })
        if p.model == 'explicit':
            metrics['global_mean'] = ratings.mean
            metrics['rmse_clipped_to'] = list(ratings.range) if ratings.range else None
        if test_reads is not None:
            metrics['test_lines'] = test_reads.line_report()
            metrics['bad_line_examples'] += [test_reads.describe_bad(b)
                                             for b in test_reads.bad_examples]
        save_json(f'{out}/metrics.json', metrics)
        yield metrics


class WriteModel(beam.PTransform):
    """TrainedModel -> singleton metrics dict. Writes the model under `dest`:
    model/{user,item,row,col}.npy (explicit also row_bias, col_bias, global_mean),
    metrics.json and errors/bad_lines-*.jsonl.
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
                    AsSingleton(model.col_factors), AsSingleton(model.evaluation),
                    AsSingleton(model.reads), AsSingleton(model.test_reads),
                    AsSingleton(model.ratings), AsSingleton(model.cold_start),
                    AsList(model.timings)))

"""Writing a trained model: model/*.npy, metrics.json (with phase_seconds, the wall
time per phase) and errors/bad_lines-*.jsonl, all under one folder."""
from __future__ import annotations

import io
import time

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsList, AsSingleton

from pipeline.training.convergence import history
from pipeline.errors import ModelCheckError
from pipeline.options import TrainConfig
from pipeline.store.files import save_json, save_npy
from pipeline.store.model_files import SEEN_FOLDER
from pipeline.strict_json import first_non_finite
from pipeline.training.model_check import ModelCheck
from pipeline.training.trained_model import TrainedModel
from wals_core import objectives
from wals_core.models import get_model
from wals_core.sparse import pair_keys


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


def seen_items(block, include_test: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(indptr int64, item indices int32 sorted per user) of the pairs the block's
    users rated in --input: training pairs and, with include_test, the hashed test
    pairs (a --test_input file is not part of what the model has seen)."""
    t = block.train
    rows, cols = t.row_of_entry(), t.indices.astype(np.int64)
    if include_test:
        rows = np.concatenate([rows, block.test_rows.astype(np.int64)])
        cols = np.concatenate([cols, block.test_cols.astype(np.int64)])
    if include_test and len(block.test_rows):
        # (row, col) int64 keys: the training pairs come sorted (CSR), so sorting
        # the test keys and then both runs with a stable sort (a merge of two runs)
        # costs a fraction of sorting all of them; the result is the same either way.
        n_train = len(t.indices)
        keys = pair_keys(rows, cols)
        keys[n_train:].sort()
        keys = np.sort(keys, kind='stable')
        rows, cols = keys >> np.int64(31), keys & np.int64(2**31 - 1)
    indptr = np.zeros(block.num_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=block.num_rows), out=indptr[1:])
    return indptr, cols.astype(np.int32)


def _write_seen(ref, dest: str, include_test: bool) -> str:
    """Saves one row block's seen items as SEEN_FOLDER/part-<block id>.npz (start,
    indptr, indices: 4 bytes per rating and 8 per user, uncompressed)."""
    block = ref.load()
    indptr, indices = seen_items(block, include_test)
    buf = io.BytesIO()
    np.savez(buf, start=np.int64(block.start), total_rows=np.int64(block.total_rows),
             indptr=indptr, indices=indices)
    path = f'{dest}/{SEEN_FOLDER}/part-{block.block_id:05d}.npz'
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())
    return path


def check_model(check: ModelCheck, users, items, metrics: dict) -> None:
    """ModelCheckError unless the model passed its check and every metric is a
    finite number (pipeline/training/model_check.py)."""
    problems = check.problems(users.ids, items.ids)
    bad = first_non_finite(metrics)
    if bad is not None:
        problems.append(f'the metric {bad[0]} is {bad[1]}: training diverged')
    if problems:
        raise ModelCheckError(
            f'the trained model failed its check, so it was not published: '
            f'{"; ".join(problems)}')


class _WriteOutputs(beam.DoFn):
    def __init__(self, config: TrainConfig, dest: str, facts_path: str | None = None):
        self._config = config
        self._dest = dest.rstrip('/')
        self._facts_path = facts_path

    def process(self, _, users, items, u, v, evaluation, reads, test_reads, ratings,
                cold_start, col_counts, states, checkpoints, comparison, changes, events,
                model_check):
        p = self._config.params
        metrics = evaluation.summary()
        metrics['test_cold_start_ratings'] += cold_start
        out = self._dest
        row, row_bias = objectives.split_bias(u.matrix, p)
        col, col_bias = objectives.split_bias(v.matrix, p)
        metrics.update({
            'model': p.model,
            'users': len(users), 'items': len(items),
            'lines': reads.line_report(),
            'bad_line_examples': [reads.describe_bad(b) for b in reads.bad_examples],
            'parameters': self._config.describe(),
            'phase_seconds': phase_seconds(events, time.time()),
        })
        phases = metrics['phase_seconds']
        metrics['history'] = history(states, phases, dict(checkpoints), p.num_iters)
        model = get_model(p.model)
        if not model.predicts_ratings:
            for entry in metrics['history']:
                entry['train_rmse'] = None    # preferences, not ratings
        metrics['iterations_run'] = sum(1 for e in metrics['history'] if e['solved'])
        metrics['final_objective'] = metrics['history'][-1]['objective'] \
            if metrics['history'] else None
        if comparison is not None:
            metrics['comparison'] = comparison
        if changes is not None:
            metrics['changes'] = changes
        if model.has_bias:
            metrics['global_mean'] = ratings.mean
        if model.clips_predictions:
            metrics['rmse_clipped_to'] = list(ratings.range) if ratings.range else None
        if test_reads is not None:
            metrics['test_lines'] = test_reads.line_report()
            metrics['bad_line_examples'] += [test_reads.describe_bad(b)
                                             for b in test_reads.bad_examples]
        check_model(model_check, users, items, metrics)
        save_npy(f'{out}/model/user.npy', users.ids)
        save_npy(f'{out}/model/item.npy', items.ids)
        save_npy(f'{out}/model/row.npy', row)
        save_npy(f'{out}/model/col.npy', col)
        # Training ratings per item: the wals weights C_j a fold-in needs.
        save_npy(f'{out}/model/col_counts.npy', np.asarray(col_counts, np.int64))
        if row_bias is not None:
            # explicit: prediction = global_mean + row_bias[i] + col_bias[j] + row[i]·col[j]
            save_npy(f'{out}/model/row_bias.npy', row_bias)
            save_npy(f'{out}/model/col_bias.npy', col_bias)
            save_npy(f'{out}/model/global_mean.npy', np.float64(ratings.mean))
        save_json(f'{out}/metrics.json', metrics)
        if self._facts_path:
            save_json(self._facts_path, model_check.facts())
        yield metrics


class WriteModel(beam.PTransform):
    """TrainedModel -> singleton metrics dict. Checks the model first (ModelCheckError
    if it fails: no model file or metrics.json is written), then writes under `dest`:
    model/{user,item,row,col,col_counts}.npy (explicit also row_bias, col_bias,
    global_mean),
    model/seen/part-*.npz (the items each user rated), metrics.json and
    errors/bad_lines-*.jsonl.
    Apply it to TrainWals' output: `model | WriteModel(config, dest)`."""

    def __init__(self, config: TrainConfig, dest: str, facts_path: str | None = None):
        super().__init__()
        self._config = config
        self._dest = dest.rstrip('/')
        self._facts_path = facts_path   # the model check's facts, for the launcher

    def expand(self, model: TrainedModel) -> beam.PCollection:
        _ = model.bad_lines | 'WriteBadLines' >> beam.io.WriteToText(
            f'{self._dest}/errors/bad_lines', file_name_suffix='.jsonl')
        _ = model.row_blocks | 'WriteSeen' >> beam.Map(
            _write_seen, self._dest, not self._config.test_input)
        return (model.users.pipeline | 'Once' >> beam.Create([None])
                | 'Write' >> beam.ParDo(
                    _WriteOutputs(self._config, self._dest, self._facts_path),
                    AsSingleton(model.users),
                    AsSingleton(model.items), AsSingleton(model.row_factors),
                    AsSingleton(model.col_factors), AsSingleton(model.evaluation),
                    AsSingleton(model.reads), AsSingleton(model.test_reads),
                    AsSingleton(model.ratings), AsSingleton(model.cold_start),
                    AsSingleton(model.col_counts), AsList(model.states),
                    AsList(model.checkpoints), AsSingleton(model.comparison),
                    AsSingleton(model.changes), AsList(model.timings),
                    AsSingleton(model.model_check)))

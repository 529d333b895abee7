"""The whole training job as composite transforms: TrainWals and WriteModel."""
from __future__ import annotations

import dataclasses
import io
import json
import time
from collections import Counter

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsList, AsSingleton

from pipeline.blocks import BlockConfig, BuildBlocks, RatingBlock
from pipeline.evaluate import Evaluate
from pipeline.factors import Alternate, Factors, factors_from_matrix
from pipeline.options import TrainConfig
from pipeline.parse import ParsedChunk
from pipeline.read import ReadConfig, ReadRatings
from wals_core.init import initial_factors
from wals_core.vocab import Vocabulary, finalize_ids

MODEL_FILES = ('user.npy', 'item.npy', 'row.npy', 'col.npy')


class _UniqueIds(beam.CombineFn):
    """ParsedChunks -> Vocabulary of one field ('users' or 'items')."""

    def __init__(self, field: str):
        self._field = field

    def create_accumulator(self):
        return set()

    def add_input(self, acc, chunk: ParsedChunk):
        acc.update(np.unique(getattr(chunk, self._field)).tolist())
        return acc

    def merge_accumulators(self, accs):
        out = set()
        for a in accs:
            out |= a
        return out

    def extract_output(self, acc):
        return Vocabulary(finalize_ids(np.array(sorted(acc), dtype=str)))


@dataclasses.dataclass
class ReadSummary:
    counts: Counter
    started_at: float
    bad_examples: list


class _SummarizeReads(beam.CombineFn):
    """ParsedChunks -> ReadSummary: line counts by outcome, first bad lines."""
    examples = 20

    def create_accumulator(self):
        return ReadSummary(Counter(), float('inf'), [])

    def add_input(self, acc, chunk: ParsedChunk):
        acc.counts.update(chunk.counts)
        acc.started_at = min(acc.started_at, chunk.started_at)
        acc.bad_examples = sorted(acc.bad_examples + chunk.bad[:self.examples],
                                  key=lambda b: (b.path, b.offset))[:self.examples]
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out.counts.update(a.counts)
            out.started_at = min(out.started_at, a.started_at)
            out.bad_examples = sorted(out.bad_examples + a.bad_examples,
                                      key=lambda b: (b.path, b.offset))[:self.examples]
        return out

    def extract_output(self, acc):
        return acc


class _AssembleCounts(beam.CombineFn):
    """Column RatingBlocks -> int64 array of training ratings per column."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, block: RatingBlock):
        acc[block.block_id] = (block.start, block.total_rows, np.diff(block.train.indptr))
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for a in accs:
            out.update(a)
        return out

    def extract_output(self, acc):
        total = next(iter(acc.values()))[1] if acc else 0
        counts = np.zeros(total, np.int64)
        for start, _, c in acc.values():
            counts[start:start + len(c)] = c
        return counts


def _count_vocab(vocab: Vocabulary, name: str) -> Vocabulary:
    Metrics.counter('wals', name).inc(len(vocab))
    return vocab


@dataclasses.dataclass
class TrainedModel:
    """The PCollections a TrainWals run produces (singletons unless noted)."""
    users: beam.PCollection        # Vocabulary
    items: beam.PCollection        # Vocabulary
    row_factors: beam.PCollection  # Factors
    col_factors: beam.PCollection  # Factors
    stats: beam.PCollection        # BlockStats
    reads: beam.PCollection        # ReadSummary
    timings: beam.PCollection      # (name, wall clock) events, several


class TrainWals(beam.PTransform):
    """PBegin -> TrainedModel: reads the ratings, builds vocabularies and blocks,
    runs num_iters alternating solves and evaluates train/test RMSE."""

    def __init__(self, config: TrainConfig):
        super().__init__()
        self._config = config

    def expand(self, pbegin):
        cfg = self._config
        p = cfg.params
        chunks = pbegin | 'Read' >> ReadRatings(ReadConfig(cfg.input, cfg.delimiter,
                                                           cfg.headers, cfg.data_type))
        users = (chunks | 'UserIds' >> beam.CombineGlobally(_UniqueIds('users'))
                 | 'CountUsers' >> beam.Map(_count_vocab, 'users'))
        items = (chunks | 'ItemIds' >> beam.CombineGlobally(_UniqueIds('items'))
                 | 'CountItems' >> beam.Map(_count_vocab, 'items'))
        reads = chunks | 'SummarizeReads' >> beam.CombineGlobally(_SummarizeReads())
        block_cfg = BlockConfig(cfg.block_size, cfg.test_fraction, cfg.split_seed,
                                'sum' if cfg.data_type == 'web_views' else 'mean')
        row_blocks, col_blocks = chunks | 'Blocks' >> BuildBlocks(block_cfg, users, items)
        col_counts = col_blocks | 'ColCounts' >> beam.CombineGlobally(_AssembleCounts())

        def init(vocab: Vocabulary, side: str) -> Factors:
            return factors_from_matrix(initial_factors(vocab.hashes, p.latent_factors,
                                                       cfg.seed, side))
        v = items | 'InitCols' >> beam.Map(init, 'col')
        u = users | 'InitRows' >> beam.Map(init, 'row')
        history = (row_blocks, col_blocks) | 'Alternate' >> Alternate(p, v, col_counts)
        if history:
            u, v = history[-1]
        stats = row_blocks | 'Evaluate' >> Evaluate(u, v, col_counts)

        events = [
            reads | 'ReadStart' >> beam.Map(lambda r: ('read_start', r.started_at)),
            col_blocks | 'BlocksBuilt' >> beam.Map(lambda b: ('blocks_built', b.built_at)),
        ]
        for it, (_, v_it) in enumerate(history, 1):
            events.append(v_it | f'Iter{it:03d}Done' >> beam.Map(
                lambda f, it: (f'iteration_{it:03d}', f.finished_at), it))
        timings = tuple(events) | 'Timings' >> beam.Flatten()
        return TrainedModel(users, items, u, v, stats, reads, timings)


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
    for name, t in events:
        if name == 'read_start':
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
    out['evaluate_and_write'] = now - prev
    return {k: (round(v, 3) if isinstance(v, float) else [round(x, 3) for x in v])
            for k, v in out.items()}


class _WriteOutputs(beam.DoFn):
    def __init__(self, config: TrainConfig):
        self._config = config

    def process(self, _, users, items, u, v, stats, reads, events):
        out = self._config.output.rstrip('/')
        save_npy(f'{out}/model/user.npy', users.ids)
        save_npy(f'{out}/model/item.npy', items.ids)
        save_npy(f'{out}/model/row.npy', u.matrix)
        save_npy(f'{out}/model/col.npy', v.matrix)
        metrics = stats.summary()
        metrics.update({
            'users': len(users), 'items': len(items),
            'lines': dict(sorted(reads.counts.items())),
            'bad_line_examples': [dataclasses.asdict(b) for b in reads.bad_examples],
            'parameters': self._config.describe(),
            'phase_seconds': phase_seconds(events, time.time()),
        })
        save_json(f'{out}/metrics.json', metrics)
        yield metrics


class WriteModel(beam.PTransform):
    """PBegin -> singleton metrics dict; writes a TrainedModel's files under
    config.output: model/{user,item,row,col}.npy and metrics.json."""

    def __init__(self, config: TrainConfig, model: TrainedModel):
        super().__init__()
        self._config = config
        self._model = model

    def expand(self, pbegin):
        model = self._model
        return (pbegin | 'Once' >> beam.Create([None])
                | 'Write' >> beam.ParDo(
                    _WriteOutputs(self._config), AsSingleton(model.users),
                    AsSingleton(model.items), AsSingleton(model.row_factors),
                    AsSingleton(model.col_factors), AsSingleton(model.stats),
                    AsSingleton(model.reads), AsList(model.timings)))

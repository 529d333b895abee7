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

from pipeline.block_store import BlockRef
from pipeline.blocks import BlockConfig, BuildBlocks
from pipeline.combine import InBlockOrder
from pipeline.evaluate import Evaluate
from pipeline.factors import Alternate, Factors, factors_from_matrix
from pipeline.options import TrainConfig
from pipeline.errors import InputError, NumericalError
from pipeline.parse import BadLine, ParsedChunk
from pipeline.read import ReadConfig, ReadRatings
from wals_core.init import initial_factors
from wals_core.vocab import Vocabulary, finalize_ids

MODEL_FILES = ('user.npy', 'item.npy', 'row.npy', 'col.npy')


class _UniqueIds(beam.CombineFn):
    """ParsedChunks -> Vocabulary of one field (user_ids or item_ids)."""

    def __init__(self, field: str):
        self._field = field

    def create_accumulator(self):
        return set()

    def add_input(self, acc, chunk: ParsedChunk):
        acc.update(getattr(chunk, self._field).tolist())
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
    """What reading found: line counts by outcome, where each range's lines start,
    files whose first line was bad (a header?) and the first bad lines."""
    counts: Counter
    started_at: float
    ranges: dict          # path -> sorted [(range offset, lines in range)]
    header_suspects: list
    bad_examples: list    # BadLine, first by (path, offset)

    def line_number(self, path: str, range_offset: int, index: int) -> int:
        """1-based line number in its file of line `index` of the range at range_offset."""
        before = sum(n for off, n in self.ranges.get(path, []) if off < range_offset)
        return before + index + 1

    def bad_total(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith('bad:'))

    def line_report(self) -> dict:
        """lines_read = kept + skipped (header, blank) + bad, with bad by reason."""
        c = self.counts
        return {
            'lines_read': c['lines_read'], 'kept': c['kept'],
            'skipped_header': c['header'], 'skipped_blank': c['blank'],
            'bad': self.bad_total(),
            'bad_by_reason': {k[4:]: n for k, n in sorted(c.items()) if k.startswith('bad:')},
        }

    def describe_bad(self, bad: BadLine) -> str:
        return (f'{bad.path}:{self.line_number(bad.path, bad.range_offset, bad.index)}: '
                f'{bad.reason}: {bad.text[:120]!r}')


class _SummarizeReads(beam.CombineFn):
    """ParsedChunks -> ReadSummary (order-independent: counts add, lists are sorted)."""
    examples = 5

    def create_accumulator(self):
        return ReadSummary(Counter(), float('inf'), {}, [], [])

    def add_input(self, acc, chunk: ParsedChunk):
        acc.counts.update(chunk.counts)
        acc.started_at = min(acc.started_at, chunk.started_at)
        acc.ranges.setdefault(chunk.path, []).append((chunk.offset, chunk.counts['lines_read']))
        if chunk.header_suspect:
            acc.header_suspects.append(chunk.path)
        examples = [dataclasses.replace(b, range_offset=chunk.offset)
                    for b in chunk.bad[:self.examples]]
        acc.bad_examples = self._first(acc.bad_examples + examples)
        return acc

    def _first(self, bad):
        return sorted(bad, key=lambda b: (b.path, b.offset))[:self.examples]

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out.counts.update(a.counts)
            out.started_at = min(out.started_at, a.started_at)
            for path, ranges in a.ranges.items():
                out.ranges.setdefault(path, []).extend(ranges)
            out.header_suspects.extend(a.header_suspects)
            out.bad_examples = self._first(out.bad_examples + a.bad_examples)
        return out

    def extract_output(self, acc):
        acc.ranges = {p: sorted(r) for p, r in sorted(acc.ranges.items())}
        acc.header_suspects = sorted(set(acc.header_suspects))
        return acc


def check_reads(summary: ReadSummary, pattern: str, max_bad_fraction: float) -> ReadSummary:
    """Fails the run (InputError) on too many bad lines or no ratings at all."""
    c = summary.counts
    bad = summary.bad_total()
    data_lines = c['lines_read'] - c['header'] - c['blank']
    hint = ''
    if summary.header_suspects:
        hint = (f'\nThe first line of {", ".join(summary.header_suspects[:3])} is bad: '
                'if the file has a header line, pass --headers.')
    examples = ''.join(f'\n  {summary.describe_bad(b)}' for b in summary.bad_examples)
    if data_lines and bad / data_lines > max_bad_fraction:
        reasons = ', '.join(f'{k} {n}' for k, n in summary.line_report()['bad_by_reason'].items())
        raise InputError(
            f'{bad} of {data_lines} lines in {pattern} are bad ({bad / data_lines:.2%}), above '
            f'--max_bad_fraction {max_bad_fraction:g}: {reasons}. First bad lines:'
            f'{examples}{hint}')
    if c['kept'] == 0:
        raise InputError(f'no ratings found in {pattern} ({c["lines_read"]} lines read, '
                         f'{bad} bad, {c["blank"]} blank, {c["header"]} header){examples}{hint}')
    return summary


def _number_bad_lines(chunk: ParsedChunk, summary: ReadSummary):
    """JSON lines {file, line, offset, reason, text} for OUTPUT/errors/."""
    for b in chunk.bad:
        yield json.dumps({'file': b.path, 'line': summary.line_number(b.path, chunk.offset, b.index),
                          'offset': b.offset, 'reason': b.reason, 'text': b.text},
                         ensure_ascii=False)


class _AssembleCounts(InBlockOrder):
    """Column BlockRefs -> int64 array of training ratings per column."""

    def keyed(self, ref: BlockRef):
        return ref.block_id, (ref.start, ref.total_rows, np.diff(ref.load().train.indptr))

    def reduce(self, blocks: list) -> np.ndarray:
        counts = np.zeros(blocks[0][1] if blocks else 0, np.int64)
        for start, _, c in blocks:
            counts[start:start + len(c)] = c
        return counts


def _count_vocab(vocab: Vocabulary, name: str, checked_reads: ReadSummary) -> Vocabulary:
    # checked_reads is unused: taking it as a side input makes everything after
    # the vocabularies wait until check_reads has passed.
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
    reads: beam.PCollection        # ReadSummary (checked)
    bad_lines: beam.PCollection    # JSON text per bad line, several
    timings: beam.PCollection      # (name, wall clock) events, several


class TrainWals(beam.PTransform):
    """PBegin -> TrainedModel: reads the ratings, builds vocabularies and blocks,
    runs num_iters alternating solves and evaluates train/test RMSE."""

    def __init__(self, config: TrainConfig, work_dir: str | None = None):
        super().__init__()
        self._config = config
        # Rating blocks are saved here once (see block_store.py); the launcher
        # passes a folder inside the run's staging folder and deletes it.
        self._work_dir = (work_dir or f'{config.output.rstrip("/")}.work').rstrip('/')

    def expand(self, pbegin):
        cfg = self._config
        p = cfg.params
        chunks = pbegin | 'Read' >> ReadRatings(ReadConfig(cfg.input, cfg.delimiter,
                                                           cfg.headers, cfg.data_type))
        reads = (chunks | 'SummarizeReads' >> beam.CombineGlobally(_SummarizeReads())
                 | 'CheckReads' >> beam.Map(check_reads, cfg.input, cfg.max_bad_fraction))
        bad_lines = chunks | 'NumberBadLines' >> beam.FlatMap(_number_bad_lines,
                                                               AsSingleton(reads))
        users = (chunks | 'UserIds' >> beam.CombineGlobally(_UniqueIds('user_ids'))
                 | 'CountUsers' >> beam.Map(_count_vocab, 'users', AsSingleton(reads)))
        items = (chunks | 'ItemIds' >> beam.CombineGlobally(_UniqueIds('item_ids'))
                 | 'CountItems' >> beam.Map(_count_vocab, 'items', AsSingleton(reads)))
        block_cfg = BlockConfig(cfg.block_size, cfg.test_fraction, cfg.split_seed,
                                'sum' if cfg.data_type == 'web_views' else 'mean')
        row_blocks, col_blocks = chunks | 'Blocks' >> BuildBlocks(block_cfg, users, items,
                                                                f'{self._work_dir}/blocks')
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
        # Each half-step's events come from a Map fused into the stage that made its
        # Factors (a Flatten per iteration would cost a stage per iteration).
        for it, (u_it, v_it) in enumerate(history, 1):
            events.append(u_it | f'Iter{it:03d}RowTimes' >> beam.FlatMap(
                lambda f, it: [(f'solve_{it:03d}', f.solve_seconds)], it))
            events.append(v_it | f'Iter{it:03d}ColTimes' >> beam.FlatMap(
                lambda f, it: [(f'iteration_{it:03d}', f.finished_at),
                               (f'solve_{it:03d}', f.solve_seconds)], it))
        timings = tuple(events) | 'Timings' >> beam.Flatten()
        return TrainedModel(users, items, u, v, stats, reads, bad_lines, timings)


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
    """PBegin -> singleton metrics dict. Writes a TrainedModel under `dest`:
    model/{user,item,row,col}.npy, metrics.json and errors/bad_lines-*.jsonl."""

    def __init__(self, config: TrainConfig, model: TrainedModel, dest: str):
        super().__init__()
        self._config = config
        self._model = model
        self._dest = dest.rstrip('/')

    def expand(self, pbegin):
        model = self._model
        _ = model.bad_lines | 'WriteBadLines' >> beam.io.WriteToText(
            f'{self._dest}/errors/bad_lines', file_name_suffix='.jsonl')
        return (pbegin | 'Once' >> beam.Create([None])
                | 'Write' >> beam.ParDo(
                    _WriteOutputs(self._config, self._dest), AsSingleton(model.users),
                    AsSingleton(model.items), AsSingleton(model.row_factors),
                    AsSingleton(model.col_factors), AsSingleton(model.stats),
                    AsSingleton(model.reads), AsList(model.timings)))


WORK_DIR = '_work'   # inside the staging folder: saved rating blocks, never published


def build_pipeline(pipeline: beam.Pipeline, config: TrainConfig, staging: str) -> str:
    """Adds the whole training job to `pipeline`, writing under `staging`; returns
    the work folder the job uses for its rating blocks (inside staging)."""
    work_dir = f'{staging.rstrip("/")}/{WORK_DIR}'
    model = pipeline | 'TrainWals' >> TrainWals(config, work_dir)
    pipeline | 'WriteModel' >> WriteModel(config, model, staging)
    return work_dir

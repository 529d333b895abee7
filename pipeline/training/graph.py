"""The training job as one Beam graph: TrainWals (read, vocabularies, blocks,
alternating solves, evaluation) and build_pipeline (TrainWals, then WriteModel).

Line accounting lives in read_summary.py, the vocabularies in vocabulary.py and
the output files in write_model.py; this file is the graph, top to bottom.
"""
from __future__ import annotations

import functools

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton

from pipeline.training import distributed_vocab
from pipeline.training.block_store import BlockRef
from pipeline.training.blocks import BlockConfig, BuildBlocks
from pipeline.training.combine import InBlockOrder
from pipeline.training.compare import CompareWithPrevious
from pipeline.training.distributed_vocab import DistributedVocabulary, initial_factors_by_range
from pipeline.training.evaluate import EvalConfig, Evaluate
from pipeline.training.model_check import FACTS, CheckModel
from pipeline.training.alternate import alternate
from pipeline.errors import InputError, RunnerError
from pipeline.training.factors import Factors, factors_from_matrix
from pipeline.store.model_files import PreviousModel, cached_model_files, index_map, stored_matrix
from pipeline.options import TrainConfig
from pipeline.training.rating_stats import SummarizeTraining
from pipeline.io.read import ReadConfig
from pipeline.io.read_summary import ReadAndCheck, ReadSummary
from pipeline.io.vocabulary import UniqueIds
from pipeline.training.trained_model import TrainedModel
from pipeline.training.write_model import WriteModel
from wals_core import objectives
from wals_core.init import initial_factors
from wals_core.vocab import Vocabulary

WORK_DIR = '_work'   # inside the staging folder: saved rating blocks, never published


class TrainWals(beam.PTransform):
    """PBegin -> TrainedModel: reads the ratings (and --test_input), builds
    vocabularies and blocks, runs num_iters alternating solves of the --model
    objective and evaluates train/test RMSE and the ranking metrics."""

    def __init__(self, config: TrainConfig, work_dir: str | None = None,
                 previous: PreviousModel | None = None):
        super().__init__()
        self._config = config
        self._previous = previous   # --previous_model, resolved by the launcher
        # Rating blocks are saved here once (see block_store.py); the launcher
        # passes a folder inside the run's staging folder and deletes it.
        self._work_dir = (work_dir or f'{config.output.rstrip("/")}.work').rstrip('/')

    def expand(self, pbegin) -> TrainedModel:
        cfg = self._config
        p = cfg.params
        chunks, reads, bad_lines = pbegin | 'Read' >> ReadAndCheck(_read_config(cfg, cfg.input),
                                                               cfg.max_bad_fraction)
        test_chunks = test_reads = None
        if cfg.test_input:
            test_chunks, test_reads, test_bad = pbegin | 'ReadTest' >> ReadAndCheck(
                _read_config(cfg, cfg.test_input), cfg.max_bad_fraction)
            bad_lines = (bad_lines, test_bad) | 'AllBadLines' >> beam.Flatten()
        else:
            test_reads = pbegin | 'NoTestInput' >> beam.Create([None])
        block_cfg = BlockConfig(cfg.block_size, cfg.test_fraction, cfg.split_seed,
                                'sum' if cfg.data_type == 'web_views' else 'mean',
                                holdout=bool(cfg.test_input))
        ranges = None
        if cfg.vocabulary == 'distributed':
            # IDs held by ranges (distributed_vocab.py); users and items, the whole
            # vocabularies, are assembled for the writer (and a previous model) only.
            ids = chunks | 'Vocabulary' >> DistributedVocabulary(
                block_cfg, reads, test_chunks, distributed_vocab.IDS_PER_RANGE)
            ranges, users, items = ids.ranges, ids.users, ids.items
            user_count = ids.user_count | 'CountUsers' >> beam.Map(
                _count_vocab, 'users', AsSingleton(reads))
            item_count = ids.item_count | 'CountItems' >> beam.Map(
                _count_vocab, 'items', AsSingleton(reads))
            build = BuildBlocks(block_cfg, user_count, item_count, f'{self._work_dir}/blocks',
                                test_chunks, indexed=(ids.pieces, None, ids.cold_start))
        else:
            users = (chunks | 'UserIds' >> beam.CombineGlobally(UniqueIds('user_ids'))
                     | 'CountUsers' >> beam.Map(_count_vocab, 'users', AsSingleton(reads)))
            items = (chunks | 'ItemIds' >> beam.CombineGlobally(UniqueIds('item_ids'))
                     | 'CountItems' >> beam.Map(_count_vocab, 'items', AsSingleton(reads)))
            build = BuildBlocks(block_cfg, users, items, f'{self._work_dir}/blocks',
                                test_chunks)
        row_blocks, col_blocks = chunks | 'Blocks' >> build
        cold_start = (build.cold_start if build.cold_start is not None
                      else pbegin | 'NoColdStart' >> beam.Create([]))
        cold_start = cold_start | 'CountColdStart' >> beam.CombineGlobally(sum)
        entries = row_blocks | 'RowEntries' >> beam.CombineGlobally(_CountEntries())
        ratings = (row_blocks | 'TrainingRatings' >> beam.CombineGlobally(SummarizeTraining())
                   | 'CheckRowCounts' >> beam.Map(
                       _check_row_counts, AsSingleton(entries), AsSingleton(reads),
                       AsSingleton(test_reads), AsSingleton(cold_start)))
        col_counts = (col_blocks | 'ColCounts' >> beam.CombineGlobally(_AssembleCounts())
                      | 'CheckColCounts' >> beam.Map(_check_col_counts, AsSingleton(ratings)))

        previous = self._previous
        warm_from = previous.path if previous is not None and previous.warm_start else None
        if ranges is not None:   # per range: the initial rows need only IDs and hashes
            v = initial_factors_by_range(ranges, 'col', functools.partial(
                initial_rows, side='col', p=p, seed=cfg.seed, warm_from=warm_from), 'InitCols')
            u = initial_factors_by_range(ranges, 'row', functools.partial(
                initial_rows, side='row', p=p, seed=cfg.seed, warm_from=None), 'InitRows')
        else:
            v = items | 'InitCols' >> beam.Map(_initial_factors, 'col', p, cfg.seed, warm_from)
            u = users | 'InitRows' >> beam.Map(_initial_factors, 'row', p, cfg.seed, None)
        run = alternate(row_blocks, col_blocks, p, u, v, col_counts, ratings, cfg.tolerance,
                        cfg.exchange, cfg.block_size, cfg.max_broadcast_mb,
                        cfg.objective_every)
        history, states = run.history, run.states
        if history:
            u, v = run.whole(len(history))
        eval_cfg = EvalConfig(p, cfg.rank_k, cfg.relevance_threshold,
                              implicit_data=cfg.data_type == 'web_views')
        evaluation = row_blocks | 'Evaluate' >> Evaluate(u, v, col_counts, ratings, eval_cfg)
        # --eval_every N: the test metrics of every N-th iteration, for the history.
        checkpoints = [pbegin | 'NoCheckpoints' >> beam.Create([])]
        every = range(cfg.eval_every, len(history), cfg.eval_every) if cfg.eval_every else ()
        for it in every:
            u_it, v_it = run.whole(it)
            checkpoints.append(
                row_blocks | f'Iter{it:03d}Evaluate' >> Evaluate(u_it, v_it, col_counts,
                                                                 ratings, eval_cfg)
                | f'Iter{it:03d}Keyed' >> beam.Map(lambda e, it: (it, e.summary()), it))
        checkpoints = tuple(checkpoints) | 'Checkpoints' >> beam.Flatten()
        comparison = changes = pbegin | 'NoPrevious' >> beam.Create([None])
        if previous is not None:
            comparison = row_blocks | 'CompareWithPrevious' >> CompareWithPrevious(
                previous.path, previous.params, eval_cfg, users, items, u, v, col_counts,
                ratings)
            changes = users | 'IdChanges' >> beam.Map(_id_changes, AsSingleton(items),
                                                      previous.path, warm_from is not None)
        states = tuple(states) | 'States' >> beam.Flatten()
        timings = _timings(reads, col_blocks, history)
        model_check = (row_blocks, col_blocks) | 'CheckModel' >> CheckModel(u, v, ratings, p)
        return TrainedModel(users, items, u, v, evaluation, reads, test_reads, ratings,
                            cold_start, bad_lines, timings, row_blocks, col_counts, states,
                            checkpoints, comparison, changes, model_check)


def _read_config(cfg: TrainConfig, pattern: str) -> ReadConfig:
    return ReadConfig(pattern, cfg.delimiter, cfg.headers, cfg.data_type,
                      max_id_length=cfg.max_id_length, max_line_bytes=cfg.max_line_bytes,
                      max_abs_value=cfg.max_abs_value)


def _initial_factors(vocab: Vocabulary, side: str, p, seed: int,
                     warm_from: str | None) -> Factors:
    return factors_from_matrix(initial_rows(vocab.ids, vocab.hashes, side, p, seed,
                                            warm_from))


def initial_rows(ids: np.ndarray, hashes: np.ndarray, side: str, p, seed: int,
                 warm_from: str | None) -> np.ndarray:
    """Per-ID seeded factors (objectives.initial_matrix) of these IDs, each row a
    function of its ID alone; with warm_from, the item factors of the IDs the
    previous model knows are taken from it (see README "Warm start": the first
    half-step then solves the users)."""
    matrix = objectives.initial_matrix(initial_factors(hashes, p.latent_factors, seed, side),
                                       p)
    if warm_from is not None:
        prev = cached_model_files(warm_from)
        index = index_map(prev.items if side == 'col' else prev.users, ids)
        known = index >= 0
        matrix[known] = stored_matrix(prev, side)[index[known]]
    return matrix


def _id_changes(users: Vocabulary, items: Vocabulary, previous_path: str,
                warm: bool) -> dict:
    """IDs added and removed against the previous model (a full dump is the truth:
    an ID absent from it leaves the model)."""
    prev = cached_model_files(previous_path)
    out = {}
    for name, vocab, old in (('users', users, prev.users), ('items', items, prev.items)):
        known = index_map(old, vocab.ids) >= 0
        out[f'{name}_added'] = int((~known).sum())
        out[f'{name}_kept'] = int(known.sum())
        out[f'{name}_removed'] = int(len(old) - known.sum())
    out['warm_started_items'] = out['items_kept'] if warm else 0
    return out


def build_pipeline(pipeline: beam.Pipeline, config: TrainConfig, staging: str,
                   previous: PreviousModel | None = None) -> str:
    """Adds the whole training job to `pipeline`, writing under `staging`; returns
    the work folder the job uses for its rating blocks (inside staging)."""
    work_dir = f'{staging.rstrip("/")}/{WORK_DIR}'
    model = pipeline | 'TrainWals' >> TrainWals(config, work_dir, previous)
    _ = model | 'WriteModel' >> WriteModel(config, staging, facts_path=f'{work_dir}/{FACTS}')
    return work_dir


MAX_ROWS = 2**31 - 1   # indices travel as int32 and pair keys pack two of them in int64


def _count_vocab(vocab: Vocabulary, name: str, checked_reads: ReadSummary) -> Vocabulary:
    # checked_reads is unused: taking it as a side input makes everything after
    # the vocabularies wait until check_reads has passed.
    if len(vocab) > MAX_ROWS:
        raise InputError(f'{len(vocab):,} distinct {name}: more than {MAX_ROWS:,}, the most '
                         'one side can index (int32 indices); nothing was trained')
    Metrics.counter('wals', name).inc(len(vocab))
    return vocab


def _check_col_counts(counts: np.ndarray, ratings) -> np.ndarray:
    """The column blocks must hold exactly the row blocks' training ratings: a
    runner that loses or repeats elements between the two fails here, loudly,
    instead of training on other data (seen once with the DirectRunner's
    multi_processing mode at 20M ratings: docs/multiprocessing-loss.md)."""
    held = int(counts.sum())
    if held != ratings.count:
        raise RunnerError(f'the column blocks hold {held:,} training ratings where the '
                          f'row blocks hold {ratings.count:,}: the runner lost or repeated '
                          'elements while building the blocks; nothing was published')
    return counts


def _check_row_counts(ratings, entries: int, reads: ReadSummary,
                      test_reads: ReadSummary | None, cold_start: int):
    """The row blocks must hold every kept line of --input and --test_input (less the
    cold-start test pairs), counting the duplicates merged away: the ratings still
    reach the row blocks through a shuffle, and a runner that drops part of a stage's
    input (Beam's FnApiRunner did: docs/multiprocessing-loss.md) fails here."""
    kept = reads.counts['kept'] + (test_reads.counts['kept'] if test_reads else 0)
    if entries != kept - cold_start:
        raise RunnerError(f'the row blocks hold {entries:,} ratings (duplicates included) '
                          f'where the input has {kept - cold_start:,}: the runner lost or '
                          'repeated elements while grouping the ratings; nothing was '
                          'published')
    return ratings


class _CountEntries(beam.CombineFn):
    """Row BlockRefs -> the ratings they were built from: training, test and the
    duplicates merged away (an integer sum: any order gives the same)."""

    def create_accumulator(self):
        return 0

    def add_input(self, acc: int, ref: BlockRef) -> int:
        block = ref.load()
        return acc + int(block.train.nnz) + len(block.test_values) + int(ref.merged)

    def merge_accumulators(self, accs) -> int:
        return sum(accs)

    def extract_output(self, acc: int) -> int:
        return acc


class _AssembleCounts(InBlockOrder):
    """Column BlockRefs -> int64 array of training ratings per column."""

    def keyed(self, ref: BlockRef):
        return ref.block_id, (ref.start, ref.total_rows, np.diff(ref.load().train.indptr))

    def reduce(self, blocks: list) -> np.ndarray:
        counts = np.zeros(blocks[0][1] if blocks else 0, np.int64)
        for start, _, c in blocks:
            counts[start:start + len(c)] = c
        return counts


def _timings(reads, col_blocks, history) -> beam.PCollection:
    """(name, wall clock or seconds) events for metrics.json's phase_seconds."""
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
    return tuple(events) | 'Timings' >> beam.Flatten()

"""The training job as one Beam graph: TrainWals (read, vocabularies, blocks,
alternating solves, evaluation) and build_pipeline (TrainWals, then WriteModel).

Line accounting lives in read_summary.py, the vocabularies in vocabulary.py and
the output files in write_model.py; this file is the graph, top to bottom.
"""
from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton

from pipeline.block_store import BlockRef
from pipeline.blocks import BlockConfig, BuildBlocks
from pipeline.combine import InBlockOrder
from pipeline.evaluate import EvalConfig, Evaluate
from pipeline.factors import Alternate, Factors, factors_from_matrix
from pipeline.options import TrainConfig
from pipeline.read import ReadConfig, ReadRatings
from pipeline.rating_stats import SummarizeTraining
from pipeline.read_summary import ReadSummary, SummarizeReads, check_reads, number_bad_lines
from pipeline.vocabulary import UniqueIds
from pipeline.write_model import WriteModel
from wals_core import objectives
from wals_core.init import initial_factors
from wals_core.vocab import Vocabulary

WORK_DIR = '_work'   # inside the staging folder: saved rating blocks, never published


class TrainedModel(NamedTuple):
    """The PCollections a TrainWals run produces (singletons unless noted). A
    NamedTuple, so that Beam records each as a named output of TrainWals."""
    users: beam.PCollection        # Vocabulary
    items: beam.PCollection        # Vocabulary
    row_factors: beam.PCollection  # Factors (explicit: bias as the last column)
    col_factors: beam.PCollection  # Factors (explicit: bias as the last column)
    evaluation: beam.PCollection   # Evaluation (RMSE sums, ranking sums, counts)
    reads: beam.PCollection        # ReadSummary (checked)
    test_reads: beam.PCollection   # ReadSummary of --test_input (checked), or None
    ratings: beam.PCollection      # RatingStats of the training ratings
    cold_start: beam.PCollection   # int: --test_input pairs with an unknown user or item
    bad_lines: beam.PCollection    # JSON text per bad line, several
    timings: beam.PCollection      # (name, wall clock) events, several


class TrainWals(beam.PTransform):
    """PBegin -> TrainedModel: reads the ratings (and --test_input), builds
    vocabularies and blocks, runs num_iters alternating solves of the --model
    objective and evaluates train/test RMSE and the ranking metrics."""

    def __init__(self, config: TrainConfig, work_dir: str | None = None):
        super().__init__()
        self._config = config
        # Rating blocks are saved here once (see block_store.py); the launcher
        # passes a folder inside the run's staging folder and deletes it.
        self._work_dir = (work_dir or f'{config.output.rstrip("/")}.work').rstrip('/')

    def expand(self, pbegin) -> TrainedModel:
        cfg = self._config
        p = cfg.params
        chunks, reads, bad_lines = pbegin | 'Read' >> _ReadChecked(cfg, cfg.input)
        users = (chunks | 'UserIds' >> beam.CombineGlobally(UniqueIds('user_ids'))
                 | 'CountUsers' >> beam.Map(_count_vocab, 'users', AsSingleton(reads)))
        items = (chunks | 'ItemIds' >> beam.CombineGlobally(UniqueIds('item_ids'))
                 | 'CountItems' >> beam.Map(_count_vocab, 'items', AsSingleton(reads)))
        test_chunks = test_reads = None
        if cfg.test_input:
            test_chunks, test_reads, test_bad = pbegin | 'ReadTest' >> _ReadChecked(
                cfg, cfg.test_input)
            bad_lines = (bad_lines, test_bad) | 'AllBadLines' >> beam.Flatten()
        else:
            test_reads = pbegin | 'NoTestInput' >> beam.Create([None])
        block_cfg = BlockConfig(cfg.block_size, cfg.test_fraction, cfg.split_seed,
                                'sum' if cfg.data_type == 'web_views' else 'mean',
                                holdout=bool(cfg.test_input))
        build = BuildBlocks(block_cfg, users, items, f'{self._work_dir}/blocks', test_chunks)
        row_blocks, col_blocks = chunks | 'Blocks' >> build
        cold_start = (build.cold_start if build.cold_start is not None
                      else pbegin | 'NoColdStart' >> beam.Create([]))
        cold_start = cold_start | 'CountColdStart' >> beam.CombineGlobally(sum)
        col_counts = col_blocks | 'ColCounts' >> beam.CombineGlobally(_AssembleCounts())
        ratings = row_blocks | 'TrainingRatings' >> beam.CombineGlobally(SummarizeTraining())

        def init(vocab: Vocabulary, side: str) -> Factors:
            return factors_from_matrix(objectives.initial_matrix(
                initial_factors(vocab.hashes, p.latent_factors, cfg.seed, side), p))
        v = items | 'InitCols' >> beam.Map(init, 'col')
        u = users | 'InitRows' >> beam.Map(init, 'row')
        history = (row_blocks, col_blocks) | 'Alternate' >> Alternate(p, v, col_counts, ratings)
        if history:
            u, v = history[-1]
        eval_cfg = EvalConfig(p, cfg.rank_k, cfg.relevance_threshold,
                              implicit_data=cfg.data_type == 'web_views')
        evaluation = row_blocks | 'Evaluate' >> Evaluate(u, v, col_counts, ratings, eval_cfg)
        timings = _timings(reads, col_blocks, history)
        return TrainedModel(users, items, u, v, evaluation, reads, test_reads, ratings,
                            cold_start, bad_lines, timings)


class _ReadChecked(beam.PTransform):
    """PBegin -> (ParsedChunks, singleton checked ReadSummary, bad-line JSON texts) of
    one input pattern: too many bad lines, or none kept, fail the run."""

    def __init__(self, cfg: TrainConfig, pattern: str):
        super().__init__()
        self._cfg, self._pattern = cfg, pattern

    def expand(self, pbegin):
        cfg = self._cfg
        chunks = pbegin | 'Read' >> ReadRatings(ReadConfig(self._pattern, cfg.delimiter,
                                                           cfg.headers, cfg.data_type))
        reads = (chunks | 'SummarizeReads' >> beam.CombineGlobally(SummarizeReads())
                 | 'CheckReads' >> beam.Map(check_reads, self._pattern, cfg.max_bad_fraction))
        bad_lines = chunks | 'NumberBadLines' >> beam.FlatMap(number_bad_lines,
                                                               AsSingleton(reads))
        return chunks, reads, bad_lines


def build_pipeline(pipeline: beam.Pipeline, config: TrainConfig, staging: str) -> str:
    """Adds the whole training job to `pipeline`, writing under `staging`; returns
    the work folder the job uses for its rating blocks (inside staging)."""
    work_dir = f'{staging.rstrip("/")}/{WORK_DIR}'
    model = pipeline | 'TrainWals' >> TrainWals(config, work_dir)
    _ = model | 'WriteModel' >> WriteModel(config, staging)
    return work_dir


def _count_vocab(vocab: Vocabulary, name: str, checked_reads: ReadSummary) -> Vocabulary:
    # checked_reads is unused: taking it as a side input makes everything after
    # the vocabularies wait until check_reads has passed.
    Metrics.counter('wals', name).inc(len(vocab))
    return vocab


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

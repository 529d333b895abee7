"""Alternating solves: factors move to the rating blocks, blocks are solved in numpy.

A half-step is a ParDo over one side's blocks with the other side's factor matrix
(and its Gramian VᵀV) and the column rating counts as side inputs. Its output
blocks are assembled into one matrix, and their partial Gramians summed in block
order, by one CombineGlobally, so no bundle order can change a bit.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import AsSingleton

from pipeline.block_store import BlockRef
from pipeline.combine import InBlockOrder
from pipeline.errors import NumericalError
from pipeline.rating_stats import RatingStats
from wals_core import objectives
from wals_core.params import WalsParams
from wals_core.solve import RowSolver, gramian

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FactorBlock:
    block_id: int
    start: int
    total_rows: int
    factors: np.ndarray        # float32, block rows × k
    partial_gramian: np.ndarray  # float64 k × k
    finished_at: float
    solve_seconds: float = 0.0   # time spent in the numpy solve of this block


@dataclasses.dataclass
class Factors:
    """One side's whole factor matrix (float32) and its Gramian (float64)."""
    matrix: np.ndarray
    gramian: np.ndarray
    finished_at: float = 0.0
    solve_seconds: float = 0.0   # summed over the blocks of this half-step


def factors_from_matrix(matrix: np.ndarray) -> Factors:
    return Factors(np.asarray(matrix, np.float32), gramian(matrix), time.time())


class _SolveBlock(beam.DoFn):
    def __init__(self, side: str, params: WalsParams, iteration: int):
        self._side = side
        self._params = params
        self._iteration = iteration

    def process(self, ref: BlockRef, other: Factors, col_counts: np.ndarray,
                ratings: RatingStats):
        block = ref.load()
        started = time.perf_counter()
        factors, offsets = objectives.solve_inputs(other.matrix, self._params)
        solver = self._solver(block, col_counts, len(other.matrix), ratings.mean)
        x = solver.solve(factors, other.gramian, other_offsets=offsets)
        if not np.all(np.isfinite(x)):
            raise NumericalError(
                f'non-finite factors in iteration {self._iteration}, {self._side} side '
                f'(block {block.block_id}); try a larger --regularization')
        x = x.astype(np.float32)
        yield FactorBlock(block.block_id, block.start, block.total_rows, x, gramian(x),
                          time.time(), time.perf_counter() - started)

    def _solver(self, block, col_counts: np.ndarray, other_rows: int,
                global_mean: float) -> RowSolver:
        """The block's RowSolver for this side and these parameters, kept with the
        cached block so that every iteration reuses its plan."""
        p = self._params
        key = (self._side, p, global_mean)
        solver = block.solvers.get(key)
        if solver is None:
            solver = block.solvers[key] = objectives.make_solver(
                block.train, self._side, p, col_counts, block.start, other_rows, global_mean)
        return solver


class _AssembleFactors(InBlockOrder):
    """FactorBlocks -> Factors; pieces are placed and summed in block-id order."""

    def __init__(self, progress: str = ''):
        self._progress = progress   # logged when done: long runs show where they are

    def keyed(self, block: FactorBlock):
        return block.block_id, block

    def reduce(self, blocks: list[FactorBlock]) -> Factors:
        if not blocks:
            return Factors(np.zeros((0, 0), np.float32), np.zeros((0, 0)), time.time())
        k = blocks[0].factors.shape[1]
        matrix = np.zeros((blocks[0].total_rows, k), np.float32)
        total = np.zeros((k, k), np.float64)
        for b in blocks:
            matrix[b.start:b.start + len(b.factors)] = b.factors
            total += b.partial_gramian
        if self._progress:
            log.info('%s: %d blocks solved', self._progress, len(blocks))
        return Factors(matrix, total, max(b.finished_at for b in blocks),
                       sum(b.solve_seconds for b in blocks))


class HalfStep(beam.PTransform):
    """PCollection[BlockRef] of one side -> singleton PCollection[Factors] of it,
    solved against `other` (singleton Factors) with `col_counts` (singleton array of
    training ratings per item) and `ratings` (singleton RatingStats: the explicit
    mode's global mean)."""

    def __init__(self, side: str, params: WalsParams, other, col_counts, ratings,
                 iteration: int):
        super().__init__()
        self._side, self._params, self._iteration = side, params, iteration
        self._other, self._counts, self._ratings = other, col_counts, ratings

    def expand(self, blocks):
        return (blocks
                | 'Solve' >> beam.ParDo(_SolveBlock(self._side, self._params, self._iteration),
                                        AsSingleton(self._other), AsSingleton(self._counts),
                                        AsSingleton(self._ratings))
                | 'Assemble' >> beam.CombineGlobally(_AssembleFactors(
                    f'iteration {self._iteration}, {self._side}s')).without_defaults())


class Alternate(beam.PTransform):
    """(row blocks, col blocks) -> list of (U, V) singleton Factors per iteration,
    starting from `col_init` (singleton Factors); num_iters × (rows, then columns),
    unrolled into one graph. `col_counts` and `ratings` as for HalfStep."""

    def __init__(self, params: WalsParams, col_init, col_counts, ratings):
        super().__init__()
        self._params, self._col_init = params, col_init
        self._counts, self._ratings = col_counts, ratings

    def expand(self, blocks):
        row_blocks, col_blocks = blocks
        p, counts, ratings = self._params, self._counts, self._ratings
        v = self._col_init
        history = []
        for it in range(1, p.num_iters + 1):
            u = row_blocks | f'Iter{it:03d}Rows' >> HalfStep('row', p, v, counts, ratings, it)
            v = col_blocks | f'Iter{it:03d}Cols' >> HalfStep('col', p, u, counts, ratings, it)
            history.append((u, v))
        return history

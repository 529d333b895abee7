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
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton

from pipeline.training.block_store import BlockRef
from pipeline.training.combine import InBlockOrder
from pipeline.errors import NumericalError
from pipeline.training.rating_stats import RatingStats
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
    count_norm: float = 0.0      # column blocks: Σ n_j ||v_j||² (objectives.count_norm)


@dataclasses.dataclass
class Factors:
    """One side's whole factor matrix (float32) and its Gramian (float64).

    matrix is None where a routed exchange (routed.py) moves the factors to the
    blocks instead: then only the Gramian and the sums travel as a side input."""
    matrix: np.ndarray | None
    gramian: np.ndarray
    finished_at: float = 0.0
    solve_seconds: float = 0.0   # summed over the blocks of this half-step
    count_norm: float = 0.0      # column side: Σ n_j ||v_j||², summed in block order


def factors_from_matrix(matrix: np.ndarray) -> Factors:
    return Factors(np.asarray(matrix, np.float32), gramian(matrix), time.time())


def factor_rows_metric(side: str):
    """Distribution of the other side's factor rows a block solve held in memory
    (the whole side when broadcast): metrics.json 'exchange' reports its maximum."""
    return Metrics.distribution('wals', f'{side}_solve_other_rows')


class _SolveBlock(beam.DoFn):
    def __init__(self, side: str, params: WalsParams, iteration: int):
        self._side = side
        self._params = params
        self._iteration = iteration
        self._held = factor_rows_metric(side)

    def process(self, ref: BlockRef, other: Factors, col_counts: np.ndarray,
                ratings: RatingStats, own: Factors | None = None, state=None):
        if state is not None and state.converged:
            # --tolerance reached: pass this block's factors through, unsolved.
            x = own.matrix[ref.start:ref.start + ref.num_rows]
            yield FactorBlock(ref.block_id, ref.start, ref.total_rows, x, gramian(x),
                              time.time(), 0.0, self._count_norm(ref, col_counts, x))
            return
        block = ref.load()
        started = time.perf_counter()
        self._held.update(len(other.matrix))
        solver = self._solver(block, col_counts, len(other.matrix), ratings.mean)
        x0 = own.matrix[ref.start:ref.start + ref.num_rows] \
            if warm_start(self._params, self._iteration) else None
        x = solve_block(solver, other.matrix, other.gramian, x0, self._params,
                        f'iteration {self._iteration}, {self._side} side '
                        f'(block {block.block_id})')
        yield FactorBlock(block.block_id, block.start, block.total_rows, x, gramian(x),
                          time.time(), time.perf_counter() - started,
                          self._count_norm(ref, col_counts, x))

    def _count_norm(self, ref: BlockRef, col_counts: np.ndarray, x: np.ndarray) -> float:
        return block_count_norm(self._side, ref.start, col_counts, x)

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


def solve_block(solver: RowSolver, other: np.ndarray, other_gramian: np.ndarray,
                x0: np.ndarray | None, params: WalsParams, where: str) -> np.ndarray:
    """One block's new factors (float32), by either exchange: the model's solve inputs
    from the other side's rows `other` (all of them, or the routed ones the solver was
    planned for), the solve from x0 (CG's warm start), and a NumericalError naming
    `where` when LAPACK fails or a factor is not finite."""
    factors, offsets = objectives.solve_inputs(other, params)
    try:
        x = solver.solve(factors, other_gramian, other_offsets=offsets, x0=x0)
    except np.linalg.LinAlgError as e:   # LAPACK on overflowing sums
        raise NumericalError(f'the solve failed in {where}: {e}; try a larger '
                             '--regularization') from None
    if not np.all(np.isfinite(x)):
        raise NumericalError(f'non-finite factors in {where}; try a larger '
                             '--regularization')
    return x.astype(np.float32)


def warm_start(params: WalsParams, iteration: int) -> bool:
    """Whether a half-step of this (1-based) iteration starts from its side's
    previous factors: --solver cg after the first iteration, as wals_core.train (the
    first starts from 0; the exact solver needs no start). The start always comes
    from the previous iteration's output, never from a worker's cache, so the result
    does not depend on which worker solves a block."""
    return params.solver == 'cg' and iteration > 1


def block_count_norm(side: str, start: int, col_counts: np.ndarray, x: np.ndarray) -> float:
    """A column block's share of Σ n_j ||v_j||² (0 for row blocks)."""
    if side != 'col':
        return 0.0
    return objectives.count_norm(col_counts[start:start + len(x)], x)


class AssembleFactors(InBlockOrder):
    """FactorBlocks -> Factors; pieces are placed and summed in block-id order.
    keep_matrix(total rows) False: only the Gramian and the sums (routed.py)."""

    def __init__(self, progress: str = '', keep_matrix=None):
        self._progress = progress   # logged when done: long runs show where they are
        self._keep_matrix = keep_matrix

    def keyed(self, block: FactorBlock):
        return block.block_id, block

    def reduce(self, blocks: list[FactorBlock]) -> Factors:
        if not blocks:
            return Factors(np.zeros((0, 0), np.float32), np.zeros((0, 0)), time.time())
        k = blocks[0].factors.shape[1]
        keep = self._keep_matrix is None or self._keep_matrix(blocks[0].total_rows)
        matrix = np.zeros((blocks[0].total_rows, k), np.float32) if keep else None
        total = np.zeros((k, k), np.float64)
        norm = 0.0
        for b in blocks:
            if keep:
                matrix[b.start:b.start + len(b.factors)] = b.factors
            total += b.partial_gramian
            norm += b.count_norm
        if self._progress:
            log.info('%s: %d blocks solved', self._progress, len(blocks))
        return Factors(matrix, total, max(b.finished_at for b in blocks),
                       sum(b.solve_seconds for b in blocks), norm)


class HalfStep(beam.PTransform):
    """PCollection[BlockRef] of one side -> singleton PCollection[Factors] of it,
    solved against `other` (singleton Factors) with `col_counts` (singleton array of
    training ratings per item) and `ratings` (singleton RatingStats: the explicit
    mode's global mean). With `state` (singleton IterationState) and `own` (this
    side's current Factors), a converged state passes `own` through unsolved; with
    --solver cg, `own` is where each block's CG starts (warm_start)."""

    def __init__(self, side: str, params: WalsParams, other, col_counts, ratings,
                 iteration: int, own=None, state=None):
        super().__init__()
        self._side, self._params, self._iteration = side, params, iteration
        self._other, self._counts, self._ratings = other, col_counts, ratings
        self._own, self._state = own, state

    def expand(self, blocks):
        extra = []
        if self._state is not None:     # --tolerance: may pass `own` through unsolved
            extra = [AsSingleton(self._own), AsSingleton(self._state)]
        elif warm_start(self._params, self._iteration):   # CG starts from `own`
            extra = [AsSingleton(self._own)]
        return (blocks
                | 'Solve' >> beam.ParDo(_SolveBlock(self._side, self._params, self._iteration),
                                        AsSingleton(self._other), AsSingleton(self._counts),
                                        AsSingleton(self._ratings), *extra)
                | 'Assemble' >> beam.CombineGlobally(AssembleFactors(
                    f'iteration {self._iteration}, {self._side}s')).without_defaults())

"""The alternating solves, unrolled: num_iters × (a row half-step, then a column
half-step), and after each iteration (or every --objective_every-th) the training
objective (convergence.py), which with --tolerance decides whether later half-steps
solve or pass through."""
from __future__ import annotations

import apache_beam as beam

from pipeline.training.convergence import (IterationState, TrainingObjective,
                                           records_objective)
from pipeline.training.factors import HalfStep
from pipeline.training.routed import ExchangePolicy, RoutedAlternate, assemble
from wals_core import objectives
from wals_core.params import WalsParams


class Alternate(beam.PTransform):
    """(row blocks, col blocks) -> (list of (U, V) singleton Factors per iteration,
    list of singleton IterationStates: the start, then one per iteration whose
    objective is computed: convergence.records_objective), starting from `row_init`
    and `col_init` (singleton Factors); num_iters × (rows, then columns), unrolled
    into one graph. `col_counts` and `ratings` as for HalfStep. With tolerance > 0,
    a half-step after convergence passes its factors through."""

    def __init__(self, params: WalsParams, row_init, col_init, col_counts, ratings,
                 tolerance: float = 0.0, objective_every: int = 1):
        super().__init__()
        self._params, self._row_init, self._col_init = params, row_init, col_init
        self._counts, self._ratings, self._tolerance = col_counts, ratings, tolerance
        self._every = objective_every

    def expand(self, blocks):
        row_blocks, col_blocks = blocks
        p, counts, ratings, tol = self._params, self._counts, self._ratings, self._tolerance
        u, v = self._row_init, self._col_init
        states = [row_blocks.pipeline | 'StartState' >> beam.Create([IterationState.start()])]
        history = []
        for it in range(1, p.num_iters + 1):
            gate = states[-1] if tol > 0 else None
            u = row_blocks | f'Iter{it:03d}Rows' >> HalfStep('row', p, v, counts, ratings, it,
                                                              own=u, state=gate)
            v = col_blocks | f'Iter{it:03d}Cols' >> HalfStep('col', p, u, counts, ratings, it,
                                                              own=v, state=gate)
            history.append((u, v))
            if records_objective(it, p.num_iters, self._every):
                states.append(row_blocks | f'Iter{it:03d}Objective' >> TrainingObjective(
                    p, tol, it, u, v, states[-1], counts, ratings))
        return history, states


class Trajectory:
    """The alternation's result: per iteration (U, V) singleton Factors (`history`;
    with a routed side, its matrix is None), the IterationStates, and `whole(it)`:
    (U, V) of iteration `it` with whole matrices, for evaluation and writing."""

    def __init__(self, history, states, blocks=None):
        self.history, self.states = history, states
        self._blocks, self._whole = blocks, {}

    def whole(self, it: int):
        if self._blocks is None:
            return self.history[it - 1]
        if it not in self._whole:
            u_blocks, v_blocks = self._blocks[it - 1]
            self._whole[it] = (assemble(u_blocks, f'Iter{it:03d}WholeRows'),
                               assemble(v_blocks, f'Iter{it:03d}WholeCols'))
        return self._whole[it]


def alternate(row_blocks, col_blocks, params: WalsParams, row_init, col_init, col_counts,
              ratings, tolerance: float, exchange: str = 'broadcast', block_size: int = 1,
              max_broadcast_mb: float = 0.0, objective_every: int = 1) -> Trajectory:
    """Alternate or RoutedAlternate by --exchange, under the label 'Alternate'."""
    if exchange == 'broadcast':
        history, states = (row_blocks, col_blocks) | 'Alternate' >> Alternate(
            params, row_init, col_init, col_counts, ratings, tolerance, objective_every)
        return Trajectory(history, states)
    policy = ExchangePolicy(exchange, int(max_broadcast_mb * (1 << 20)),
                            objectives.stored_width(params))
    history, states, blocks = (row_blocks, col_blocks) | 'Alternate' >> RoutedAlternate(
        params, row_init, col_init, col_counts, ratings, tolerance, block_size, policy,
        objective_every)
    return Trajectory(history, states, blocks)

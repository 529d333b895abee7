"""The training objective after every iteration, and early stopping (--tolerance).

After iteration t (every --objective_every-th iteration and the last; by default
every one) a small branch sums every row block's share of the objective
(wals_core.objectives.block_objective) in block order, adds the terms over all
pairs from the Gramians, and emits an IterationState. With --tolerance > 0 the
next iteration's half-steps read the latest state: once the relative change of
the objective since the state before it has fallen below the tolerance they pass
their factors through instead of solving. The graph stays unrolled (Beam graphs
are static), but a skipped half-step costs a copy of the factors, not a solve.
The objective's products are float32, like the factors (about 1e-8 relative): a
tolerance below ~1e-7 is below its precision.
"""
from __future__ import annotations

import dataclasses
import math

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import AsSingleton

from pipeline.training.block_store import BlockRef
from pipeline.training.combine import InBlockOrder
from pipeline.training.factors import Factors
from pipeline.training.rating_stats import RatingStats
from wals_core import objectives
from wals_core.params import WalsParams


@dataclasses.dataclass(frozen=True)
class IterationState:
    iteration: int
    objective: float          # the mode's loss, regularization included
    train_sse: float          # squared error of the training ratings (see block_objective)
    train_count: int
    solved: bool              # False: the iteration passed its factors through
    converged: bool           # the objective has stopped changing: skip what follows

    @classmethod
    def start(cls) -> 'IterationState':
        return cls(0, math.nan, math.nan, 0, True, False)

    @property
    def train_rmse(self) -> float | None:
        return math.sqrt(self.train_sse / self.train_count) if self.train_count else None


class SumTerms(InBlockOrder):
    """(block id, (objective part, sse, count)) -> their sums in block order."""

    def keyed(self, element):
        return element

    def reduce(self, parts: list) -> tuple[float, float, int]:
        total = sse = 0.0
        count = 0
        for a, b, c in parts:
            total += a
            sse += b
            count += c
        return total, sse, count


def records_objective(iteration: int, num_iters: int, every: int) -> bool:
    """Whether the objective of `iteration` is computed: every `every`-th iteration
    and the last (every = 0: the last only). Each is a pass over every training
    rating that the solves do not need (docs/speed.md: what it costs)."""
    return iteration == num_iters or (every > 0 and iteration % every == 0)


def _block_terms(ref: BlockRef, u: Factors, v: Factors, col_counts: np.ndarray,
                 ratings: RatingStats, params: WalsParams):
    block = ref.load()
    part, sse = objectives.block_objective(block.train, block.start, u.matrix, v.matrix,
                                           params, col_counts, ratings.mean)
    return block.block_id, (part, sse, block.train.nnz)


def next_state(terms, u: Factors, v: Factors, previous: IterationState,
               params: WalsParams, tolerance: float, iteration: int) -> IterationState:
    """The IterationState of `iteration`: the summed block terms plus the terms
    over all pairs (Gramians, column regularization), and the convergence test."""
    part, sse, count = terms
    value = part + objectives.global_objective(u.gramian, v.gramian, params, v.count_norm)
    solved = not previous.converged
    change = abs(previous.objective - value) / max(abs(previous.objective), 1e-300) \
        if math.isfinite(previous.objective) else math.inf
    converged = previous.converged or (tolerance > 0 and change < tolerance)
    return IterationState(iteration, value, sse, count, solved, converged)


class TrainingObjective(beam.PTransform):
    """PCollection[BlockRef] (row blocks) -> singleton IterationState of iteration
    `iteration` from its factors `u`, `v` (singleton Factors), the previous
    iteration's state, `col_counts` and `ratings` (singletons)."""

    def __init__(self, params: WalsParams, tolerance: float, iteration: int, u, v,
                 previous, col_counts, ratings):
        super().__init__()
        self._params, self._tolerance, self._iteration = params, tolerance, iteration
        self._u, self._v, self._previous = u, v, previous
        self._counts, self._ratings = col_counts, ratings

    def expand(self, row_blocks):
        u, v, counts = AsSingleton(self._u), AsSingleton(self._v), AsSingleton(self._counts)
        return (row_blocks
                | 'Terms' >> beam.Map(_block_terms, u, v, counts, AsSingleton(self._ratings),
                                      self._params)
                # No default for an empty input (a run always has row blocks): Beam
                # would add a stage per iteration to inject it.
                | 'Sum' >> beam.CombineGlobally(SumTerms()).without_defaults()
                | 'State' >> beam.Map(next_state, u, v, AsSingleton(self._previous),
                                      self._params, self._tolerance, self._iteration))


def history(states: list[IterationState], phases: dict, evaluations: dict,
            num_iters: int) -> list[dict]:
    """metrics.json's convergence history: one entry per iteration. An iteration
    whose objective was not computed (--objective_every) has None for it and for the
    train RMSE; it solved unless an earlier state had converged."""
    per_iter = phases.get('per_iteration', [])
    solve = phases.get('solve_per_iteration', [])
    by_iteration = {s.iteration: s for s in states}
    converged = False
    out = []
    for it in range(1, num_iters + 1):
        i = it - 1
        s = by_iteration.get(it)
        if s is None:
            entry = {'iteration': it, 'objective': None, 'train_rmse': None,
                     'solved': not converged}
        else:
            entry = {'iteration': it, 'objective': s.objective,
                     'train_rmse': s.train_rmse, 'solved': s.solved}
            converged = s.converged
        entry['seconds'] = per_iter[i] if i < len(per_iter) else None
        entry['solve_seconds'] = solve[i] if i < len(solve) else None
        if it in evaluations:
            entry['test'] = evaluations[it]
        out.append(entry)
    return out

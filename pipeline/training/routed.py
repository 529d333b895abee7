"""The routed factor exchange (--exchange routed|auto): factors move to the blocks
that need them, as Spark ALS's in-blocks and out-blocks, instead of the whole other
side being broadcast to every worker.

Worked out once per rating block and kept with it in the block cache (_Routes):
* out-routes: for every block of the other side, the rows of this block that one
  of its ratings refers to (a user's factors go to the item blocks it rated);
* in-index: the sorted other-side rows this block's ratings refer to, and the
  block's ratings with their column numbers renumbered to positions in it.

Each half-step then joins every block with the factor pieces addressed to it
(CoGroupByKey by block id), solves against exactly those rows, and emits its new
factors as pieces addressed to the other side's blocks. Only the k × k Gramian
and a few sums stay a side input. The solver sees the same factor values at the
same entries in the same order, so its answers, and the objective, are
bit-identical to the broadcast exchange (tests/test_exchange.py).

With --exchange auto each side decides at run time (its row count is known only
then): a side whose factor matrix is above --max_broadcast_mb is routed, a smaller
one is broadcast as today, inside the same graph.
"""
from __future__ import annotations

import dataclasses
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton

from pipeline.training.block_store import BlockRef, RatingBlock
from pipeline.training.convergence import (IterationState, SumTerms, next_state,
                                           records_objective)
from pipeline.training.factors import (AssembleFactors, FactorBlock, Factors, block_count_norm,
                                       factor_rows_metric, solve_block, warm_start)
from pipeline.training.rating_stats import RatingStats
from wals_core import objectives
from wals_core.params import WalsParams
from wals_core.solve import gramian
from wals_core.sparse import Csr

PIECES = 'pieces'


@dataclasses.dataclass(frozen=True)
class ExchangePolicy:
    """Which sides are routed: all ('routed'), or those whose float32 factor matrix
    is above max_broadcast_bytes ('auto')."""
    exchange: str              # 'routed' or 'auto'
    max_broadcast_bytes: int
    width: int                 # stored factor columns (objectives.stored_width)

    def routed(self, total_rows: int) -> bool:
        return self.exchange == 'routed' or \
            total_rows * self.width * 4 > self.max_broadcast_bytes

    def broadcast(self, total_rows: int) -> bool:
        return not self.routed(total_rows)


@dataclasses.dataclass
class FactorPiece:
    """Factor rows of one source block, addressed to one block of the other side."""
    source: int                # source block id (pieces are ordered by it)
    rows: np.ndarray           # int64 global row numbers, sorted
    factors: np.ndarray        # float32, len(rows) × width


class _Routes:
    """A rating block's out-routes and in-index (see the module docstring)."""

    def __init__(self, block: RatingBlock, block_size: int):
        t = block.train
        n = t.num_rows
        self.needed = np.unique(np.asarray(t.indices, np.int64))
        self.train = Csr(t.indptr, np.searchsorted(self.needed, t.indices).astype(np.int32),
                         t.values)
        if n and t.nnz:
            key = np.unique((np.asarray(t.indices, np.int64) // block_size) * n
                            + t.row_of_entry())
            dest, rows = np.divmod(key, n)
            cuts = np.flatnonzero(np.diff(dest)) + 1
            self.dests = dest[np.r_[0, cuts]]
            self.rows = np.split(rows, cuts)
        else:
            self.dests, self.rows = np.zeros(0, np.int64), []

    @property
    def plan_nbytes(self) -> int:   # counted by the block cache
        return (self.needed.nbytes + self.train.indices.nbytes
                + sum(r.nbytes for r in self.rows))


def routes(block: RatingBlock, block_size: int) -> _Routes:
    key = ('routes', block_size)
    r = block.solvers.get(key)
    if r is None:
        r = block.solvers[key] = _Routes(block, block_size)
    return r


def needed_factors(r: _Routes, pieces, other: Factors) -> np.ndarray:
    """The other side's factor rows r.needed, from the broadcast matrix if the side
    is broadcast, else from the pieces addressed to this block."""
    if other.matrix is not None:
        return other.matrix[r.needed]
    pieces = sorted(pieces, key=lambda p: p.source)
    width = other.gramian.shape[0]
    if not pieces:
        got, out = np.zeros(0, np.int64), np.zeros((0, width), np.float32)
    else:
        got = np.concatenate([p.rows for p in pieces])
        out = np.concatenate([p.factors for p in pieces])
    if not np.array_equal(got, r.needed):
        raise RuntimeError(f'routed exchange: {len(got)} factor rows arrived where the '
                           f'block needs {len(r.needed)}; the routes are inconsistent')
    return out


def _emit_pieces(block: RatingBlock, x: np.ndarray, r: _Routes, sent=None):
    if sent is not None:
        sent.inc(int(sum(len(rows) for rows in r.rows)))
    for dest, rows in zip(r.dests.tolist(), r.rows):
        yield beam.pvalue.TaggedOutput(PIECES, (dest, FactorPiece(
            block.block_id, rows + block.start, np.ascontiguousarray(x[rows]))))


def _joined(element):
    block_id, parts = element
    refs = list(parts['ref'])
    if len(refs) != 1:
        raise RuntimeError(f'block {block_id}: {len(refs)} rating blocks in the exchange')
    own = list(parts.get('own', ()))
    return refs[0], list(parts.get('pieces', ())), own[0] if own else None


class _SolveRouted(beam.DoFn):
    """(block id, {ref, pieces, own}) -> FactorBlock, and on PIECES this block's new
    factors addressed to the other side's blocks (when this side is routed)."""

    def __init__(self, side: str, params: WalsParams, iteration: int, block_size: int,
                 policy: ExchangePolicy):
        self._side, self._params, self._iteration = side, params, iteration
        self._block_size, self._policy = block_size, policy
        self._held = factor_rows_metric(side)
        self._sent = Metrics.counter('wals', f'{side}_rows_routed')

    def process(self, element, other: Factors, col_counts: np.ndarray, ratings: RatingStats,
                state: IterationState | None = None):
        ref, pieces, own = _joined(element)
        block = ref.load()
        r = routes(block, self._block_size)
        started = time.perf_counter()
        if state is not None and state.converged:
            x, seconds = own.factors, 0.0     # --tolerance reached: pass through
        else:
            v = needed_factors(r, pieces, other)
            self._held.update(len(other.matrix) if other.matrix is not None else len(v))
            x0 = own.factors if warm_start(self._params, self._iteration) else None
            x = solve_block(self._solver(block, r, col_counts, ratings.mean), v,
                            other.gramian, x0, self._params,
                            f'iteration {self._iteration}, {self._side} side '
                            f'(block {block.block_id})')
            seconds = time.perf_counter() - started
        yield FactorBlock(block.block_id, block.start, block.total_rows, x, gramian(x),
                          time.time(), seconds,
                          block_count_norm(self._side, block.start, col_counts, x))
        if self._policy.routed(block.total_rows):
            yield from _emit_pieces(block, x, r, self._sent)

    def _solver(self, block: RatingBlock, r: _Routes, col_counts: np.ndarray,
                global_mean: float):
        p = self._params
        key = (self._side, p, global_mean, 'routed')
        solver = block.solvers.get(key)
        if solver is None:
            solver = block.solvers[key] = objectives.make_solver(
                r.train, self._side, p, col_counts, block.start, len(r.needed), global_mean,
                other_index=r.needed)
        return solver


def _initial_pieces(ref: BlockRef, init: Factors, block_size: int, policy: ExchangePolicy):
    """The initial factors of one block as pieces (when its side is routed)."""
    if policy.routed(ref.total_rows):
        block = ref.load()
        x = init.matrix[block.start:block.start + block.num_rows]
        for tagged in _emit_pieces(block, x, routes(block, block_size)):
            yield tagged.value


def _light(f: Factors, policy: ExchangePolicy) -> Factors:
    """The Factors side input of the next half-step: without the matrix if routed."""
    if f.matrix is not None and policy.routed(len(f.matrix)):
        return dataclasses.replace(f, matrix=None)
    return f


def _routed_terms(element, v: Factors, col_counts: np.ndarray, ratings: RatingStats,
                  params: WalsParams, block_size: int):
    """A row block's share of the objective (as convergence._block_terms) from its own
    factors and the column factors routed to it."""
    ref, pieces, own = _joined(element)
    block = ref.load()
    r = routes(block, block_size)
    part, sse = objectives.block_objective(r.train, 0, own.factors,
                                           needed_factors(r, pieces, v), params,
                                           col_counts[r.needed], ratings.mean)
    return block.block_id, (part, sse, block.train.nnz)


def _keyed(pcoll, label: str):
    return pcoll | label >> beam.Map(lambda x: (x.block_id, x))


class RoutedAlternate(beam.PTransform):
    """(row blocks, col blocks) -> (history, states, blocks) like alternate.Alternate,
    with the routed exchange: history holds per iteration the (U, V) singleton
    Factors (matrix None for a routed side), blocks the (U, V) PCollections of
    FactorBlock, from which assemble() makes whole matrices where they are needed."""

    def __init__(self, params: WalsParams, row_init, col_init, col_counts, ratings,
                 tolerance: float, block_size: int, policy: ExchangePolicy,
                 objective_every: int = 1):
        super().__init__()
        self._params, self._row_init, self._col_init = params, row_init, col_init
        self._counts, self._ratings, self._tolerance = col_counts, ratings, tolerance
        self._block_size, self._policy = block_size, policy
        self._every = objective_every

    def expand(self, blocks):
        row_blocks, col_blocks = blocks
        p, tol, bs, policy = self._params, self._tolerance, self._block_size, self._policy
        counts, ratings = AsSingleton(self._counts), AsSingleton(self._ratings)
        row_refs = _keyed(row_blocks, 'KeyRowBlocks')
        col_refs = _keyed(col_blocks, 'KeyColBlocks')
        v_light = self._col_init | 'InitColsLight' >> beam.Map(_light, policy)
        v_pieces = col_blocks | 'InitColPieces' >> beam.FlatMap(
            _initial_pieces, AsSingleton(self._col_init), bs, policy)
        states = [row_blocks.pipeline | 'StartState' >> beam.Create([IterationState.start()])]
        history, block_history = [], []
        u_light = u_blocks = v_blocks = None
        if p.num_iters == 0:
            return history, states, block_history

        def join(label, refs, pieces, own):
            parts = {'ref': refs, 'pieces': pieces}
            if own is not None:
                parts['own'] = _keyed(own, f'{label}KeyOwn')
            return parts | label >> beam.CoGroupByKey()

        def objective(label, joined, it):
            return (joined
                    | f'{label}Terms' >> beam.Map(_routed_terms, AsSingleton(v_light), counts,
                                                  ratings, p, bs)
                    | f'{label}Sum' >> beam.CombineGlobally(SumTerms()).without_defaults()
                    | f'{label}State' >> beam.Map(next_state, AsSingleton(u_light),
                                                  AsSingleton(v_light),
                                                  AsSingleton(states[-1]), p, tol, it))

        for it in range(0, p.num_iters + 1):
            name = f'Iter{it + 1:03d}'
            # The row blocks with V of iteration `it` (and their own U of it): the
            # objective of iteration `it` and the row solves of iteration it + 1.
            row_join = join(f'{name}JoinRows', row_refs, v_pieces, u_blocks)
            if it >= 1 and records_objective(it, p.num_iters, self._every):
                states.append(objective(f'Iter{it:03d}Objective', row_join, it))
            if it == p.num_iters:
                break
            gate = AsSingleton(states[-1]) if tol > 0 else None
            extra = [gate] if gate is not None else []
            u_out = row_join | f'{name}SolveRows' >> beam.ParDo(
                _SolveRouted('row', p, it + 1, bs, policy), AsSingleton(v_light), counts,
                ratings, *extra).with_outputs(PIECES, main='blocks')
            u_blocks = u_out.blocks
            u_light = u_blocks | f'{name}RowGramian' >> beam.CombineGlobally(
                AssembleFactors(f'iteration {it + 1}, rows', policy.broadcast)
            ).without_defaults()
            # The column blocks' own previous factors: the --tolerance pass-through
            # and the CG start (the row join above always carries them).
            col_join = join(f'{name}JoinCols', col_refs, u_out[PIECES],
                            v_blocks if tol > 0 or p.solver == 'cg' else None)
            v_out = col_join | f'{name}SolveCols' >> beam.ParDo(
                _SolveRouted('col', p, it + 1, bs, policy), AsSingleton(u_light), counts,
                ratings, *extra).with_outputs(PIECES, main='blocks')
            v_blocks, v_pieces = v_out.blocks, v_out[PIECES]
            v_light = v_blocks | f'{name}ColGramian' >> beam.CombineGlobally(
                AssembleFactors(f'iteration {it + 1}, cols', policy.broadcast)
            ).without_defaults()
            history.append((u_light, v_light))
            block_history.append((u_blocks, v_blocks))
        return history, states, block_history


def assemble(factor_blocks, label: str):
    """PCollection[FactorBlock] -> singleton Factors with the whole matrix."""
    return factor_blocks | label >> beam.CombineGlobally(AssembleFactors()).without_defaults()


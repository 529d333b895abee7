"""The composite transforms one at a time, as Beam tests them: a TestPipeline on the
DirectRunner, the transform applied to small inputs, and assert_that against the
same thing computed directly with numpy and wals_core."""
from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.pvalue import AsSingleton
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.io.read import ReadConfig
from pipeline.io.read_summary import ReadAndCheck
from pipeline.io.vocabulary import UniqueIds
from pipeline.training.blocks import BlockConfig, BuildBlocks
from pipeline.training.convergence import IterationState, TrainingObjective
from pipeline.training.evaluate import EvalConfig, Evaluate
from pipeline.training.factors import HalfStep, factors_from_matrix
from pipeline.training.graph import _AssembleCounts
from pipeline.training.rating_stats import SummarizeTraining
from wals_core import objectives
from wals_core.params import WalsParams
from wals_core.sparse import csr_from_triples
from wals_core.vocab import finalize_ids

USERS, ITEMS = 40, 25


@pytest.fixture
def ratings(tmp_path):
    """A small ratings file (distinct pairs, integer IDs) and its triples."""
    rng = np.random.default_rng(3)
    pairs = rng.choice(USERS * ITEMS, size=400, replace=False)
    users, items = pairs // ITEMS + 1, pairs % ITEMS + 1
    values = rng.integers(1, 6, len(pairs)).astype(np.float64)
    path = tmp_path / 'r.tsv'
    path.write_text(''.join(f'{u}\t{i}\t{int(v)}\n' for u, i, v in zip(users, items, values)))
    return path, users - 1, items - 1, values   # rows and columns are ID order here


def _read(p, path, max_bad_fraction=0.1, **kw):
    return p | ReadAndCheck(ReadConfig(str(path), '\t', False, 'ratings', **kw),
                            max_bad_fraction)


def _blocks(p, path, block_size=16):
    """(row blocks, column blocks, users, items, col_counts, ratings) of a file, all
    training (test_fraction 0), as the training graph builds them."""
    chunks, reads, _ = _read(p, path)
    users = chunks | 'Users' >> beam.CombineGlobally(UniqueIds('user_ids'))
    items = chunks | 'Items' >> beam.CombineGlobally(UniqueIds('item_ids'))
    rows, cols = chunks | BuildBlocks(BlockConfig(block_size, 0.0, 0, 'mean'), users, items,
                                      str(path.parent / 'blocks'))
    counts = cols | 'Counts' >> beam.CombineGlobally(_AssembleCounts())
    stats = rows | 'Stats' >> beam.CombineGlobally(SummarizeTraining())
    return rows, cols, users, items, counts, stats


def test_read_and_check_accounts_for_every_line(tmp_path):
    path = tmp_path / 'r.tsv'
    path.write_text('1\t2\t3\n\n1\tx\tnope\n2\t3\t4\nonly-two\tfields\n')
    with BeamTestPipeline() as p:
        chunks, reads, bad = _read(p, path, 0.5, split_bytes=8)
        kept = chunks | beam.FlatMap(lambda c: zip(c.users.tolist(), c.items.tolist(),
                                                   c.values.tolist()))
        assert_that(kept, equal_to([('1', '2', 3.0), ('2', '3', 4.0)]), label='Kept')
        assert_that(reads | beam.Map(lambda r: r.line_report()), equal_to([{
            'lines_read': 5, 'kept': 2, 'skipped_header': 0, 'skipped_blank': 1, 'bad': 2,
            'bad_by_reason': {'not_a_number': 1, 'too_few_fields': 1}}]), label='Counts')
        assert_that(bad | beam.Map(lambda t: (json.loads(t)['line'], json.loads(t)['reason'])),
                    equal_to([(3, 'not_a_number'), (5, 'too_few_fields')]), label='Bad')


def test_build_blocks_holds_every_rating_once_by_row_and_by_column(ratings):
    path, rows, cols, values = ratings
    want = csr_from_triples(rows, cols, values, USERS)
    want_t = csr_from_triples(cols, rows, values, ITEMS)

    def dense(refs, n_rows, n_cols):
        out = np.zeros((n_rows, n_cols))
        for ref in refs:
            b = ref.load()
            r = b.train.row_of_entry() + b.start
            out[r, b.train.indices] = b.train.values
        return [out.tobytes()]

    with BeamTestPipeline() as p:
        row_blocks, col_blocks, *_ = _blocks(p, path)
        by_rows = (row_blocks | 'AllRows' >> beam.combiners.ToList()
                   | 'DenseRows' >> beam.FlatMap(dense, USERS, ITEMS))
        by_cols = (col_blocks | 'AllCols' >> beam.combiners.ToList()
                   | 'DenseCols' >> beam.FlatMap(dense, ITEMS, USERS))
        dense_want = np.zeros((USERS, ITEMS))
        dense_want[rows, cols] = values
        assert_that(by_rows, equal_to([dense_want.tobytes()]), label='Rows')
        assert_that(by_cols, equal_to([np.ascontiguousarray(dense_want.T).tobytes()]),
                    label='Cols')
        assert_that(row_blocks | 'Ids' >> beam.Map(lambda r: (r.block_id, r.num_rows)),
                    equal_to([(0, 16), (1, 16), (2, 8)]), label='RowBlocks')
    assert want.nnz == want_t.nnz == len(values)


@pytest.mark.parametrize('model', ['wals', 'implicit', 'explicit'])
def test_half_step_solves_every_block_as_one_solver_over_all_rows(ratings, model):
    """HalfStep over 3 row blocks == objectives.make_solver over the whole matrix."""
    path, rows, cols, values = ratings
    params = WalsParams(model=model, latent_factors=3, regularization=0.5,
                        scale_regularization=model == 'implicit')
    rng = np.random.default_rng(5)
    v = rng.normal(size=(ITEMS, objectives.stored_width(params))).astype(np.float32)
    by_row = csr_from_triples(rows, cols, values, USERS)
    counts = np.bincount(cols, minlength=ITEMS).astype(np.int64)
    mean = float(values.mean())
    factors, offsets = objectives.solve_inputs(v, params)
    want = objectives.make_solver(by_row, 'row', params, counts, 0, ITEMS, mean).solve(
        factors, factors_from_matrix(v).gramian, other_offsets=offsets).astype(np.float32)

    with BeamTestPipeline() as p:
        row_blocks, _, _, _, col_counts, stats = _blocks(p, path)
        other = p | 'V' >> beam.Create([factors_from_matrix(v)])
        u = row_blocks | HalfStep('row', params, other, col_counts, stats, 1)
        assert_that(u | 'Matrix' >> beam.Map(lambda f: f.matrix.tobytes()),
                    equal_to([want.tobytes()]))


def test_evaluate_and_objective_of_given_factors(ratings):
    """Evaluate's train RMSE and TrainingObjective's value against numpy on the same
    factors (every rating is training here)."""
    path, rows, cols, values = ratings
    params = WalsParams(latent_factors=4)
    rng = np.random.default_rng(9)
    u = rng.normal(size=(USERS, 4)).astype(np.float32)
    v = rng.normal(size=(ITEMS, 4)).astype(np.float32)
    err = values - np.einsum('ij,ij->i', u[rows].astype(np.float64), v[cols].astype(np.float64))
    want_rmse = float(np.sqrt(np.mean(err ** 2)))
    by_row = csr_from_triples(rows, cols, values, USERS)
    counts = np.bincount(cols, minlength=ITEMS).astype(np.int64)
    want_objective = objectives.objective(by_row, counts, u, v, params)

    with BeamTestPipeline() as p:
        row_blocks, _, _, _, col_counts, stats = _blocks(p, path)
        uf = p | 'U' >> beam.Create([factors_from_matrix(u)])
        vf = p | 'V' >> beam.Create([factors_from_matrix(v)])
        evaluation = row_blocks | Evaluate(uf, vf, col_counts, stats,
                                           EvalConfig(params, rank_k=0))
        start = p | 'Start' >> beam.Create([IterationState.start()])
        state = row_blocks | TrainingObjective(params, 0.0, 1, uf, vf, start, col_counts,
                                               stats)

        def check_rmse(found):
            (summary,) = [e.summary() for e in found]
            assert summary['train_ratings'] == len(values) and summary['test_ratings'] == 0
            assert summary['train_rmse'] == pytest.approx(want_rmse, rel=1e-12)

        def check_objective(found):
            (s,) = found
            assert s.iteration == 1 and s.train_count == len(values)
            # float32 products of the stored factors, float64 sums (convergence.py)
            assert s.objective == pytest.approx(want_objective, rel=1e-6)

        assert_that(evaluation, check_rmse, label='Rmse')
        assert_that(state, check_objective, label='Objective')


def test_vocabularies_are_sorted_numerically_for_integer_ids(ratings):
    path, *_ = ratings
    with BeamTestPipeline() as p:
        chunks, _, _ = _read(p, path)
        users = chunks | beam.CombineGlobally(UniqueIds('user_ids'))
        assert_that(users | beam.Map(lambda v: v.ids.tolist()),
                    equal_to([finalize_ids(np.arange(1, USERS + 1).astype(str)).tolist()]))

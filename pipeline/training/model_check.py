"""The trained model's sanity check, in the pipeline (before anything is written)
and its facts for the launcher's second look (pipeline/store/model_check.py, in
the gate before publishing).

The rules are wals_core/model_check.py's: finite factors, no all-zero vector for a
row whose training data has a target, and (wals, implicit) at least one target in
the whole input. A model that fails is never written, published or promoted: the
run ends with ModelCheckError (exit code 4), saying which check failed and for how
many rows.
"""
from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import AsSingleton

from pipeline.training.block_store import BlockRef
from pipeline.training.factors import Factors
from pipeline.training.rating_stats import RatingStats
from wals_core.model_check import SideCheck, check_rows, target_rows
from wals_core.models import get_model
from wals_core.params import WalsParams

FACTS = 'model_check.json'    # in the run's work folder: the facts for the launcher
_NAMES = {'row': ('user', 'users'), 'col': ('item', 'items')}


@dataclasses.dataclass
class ModelCheck:
    """What the check found on both sides, and the objective it judged."""
    model: str
    row: SideCheck = dataclasses.field(default_factory=SideCheck)
    col: SideCheck = dataclasses.field(default_factory=SideCheck)

    def problems(self, users: np.ndarray, items: np.ndarray) -> list[str]:
        """One sentence per failed check ([] when the model passed)."""
        out = []
        for side, ids in (('row', users), ('col', items)):
            one, many = _NAMES[side]
            c: SideCheck = getattr(self, side)
            if c.nonfinite_rows:
                out.append(f'{c.nonfinite_rows:,} of {c.rows:,} {many} have a factor that is '
                           f'not a finite number (the first: {one} '
                           f'{_id(ids, c.first_nonfinite)})')
            if c.zero_rows:
                out.append(f'{c.zero_rows:,} of the {c.target_rows:,} {many} with training '
                           f'ratings have an all-zero vector (the first: {one} '
                           f'{_id(ids, c.first_zero)}): the factorization collapsed, as one '
                           'extreme rating (see --max_abs_value) or extreme parameters can '
                           'make it')
        message = get_model(self.model).no_target_message
        if message and self.row.rows and not self.row.target_rows:
            out.append(message)
        return out

    def facts(self) -> dict:
        """The launcher's expectations (JSON): rows and target rows per side."""
        return {'model': self.model,
                **{side: dataclasses.asdict(getattr(self, side)) for side in ('row', 'col')}}


def _id(ids: np.ndarray, row: int) -> str:
    return repr(ids[row].item()) if 0 <= row < len(ids) else f'#{row}'


def _check_block(ref: BlockRef, side: str, factors: Factors, ratings: RatingStats,
                 params: WalsParams) -> tuple[str, SideCheck]:
    block = ref.load()
    targets = target_rows(block.train.indptr, block.train.values, params, ratings.mean)
    stored = factors.matrix[ref.start:ref.start + ref.num_rows]
    return side, check_rows(stored, targets, ref.start)


class _Merge(beam.CombineFn):
    """(side, SideCheck) per block -> ModelCheck (sums and minima: any order)."""

    def __init__(self, model: str):
        self._model = model

    def create_accumulator(self):
        return ModelCheck(self._model)

    def add_input(self, acc: ModelCheck, element):
        side, check = element
        setattr(acc, side, getattr(acc, side).merge(check))
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out.row, out.col = out.row.merge(a.row), out.col.merge(a.col)
        return out

    def extract_output(self, acc):
        return acc


class CheckModel(beam.PTransform):
    """(row BlockRefs, column BlockRefs) -> singleton ModelCheck of the final
    factors `u` and `v` (singleton Factors, the bias as their last column for
    explicit), with the training RatingStats `ratings` (the global mean)."""

    def __init__(self, u, v, ratings, params: WalsParams):
        super().__init__()
        self._u, self._v, self._ratings, self._params = u, v, ratings, params

    def expand(self, blocks):
        row_blocks, col_blocks = blocks
        checks = [
            blocks_ | f'Check{side.capitalize()}s' >> beam.Map(
                _check_block, side, AsSingleton(factors), AsSingleton(self._ratings),
                self._params)
            for side, blocks_, factors in (('row', row_blocks, self._u),
                                           ('col', col_blocks, self._v))]
        return (tuple(checks) | 'Sides' >> beam.Flatten()
                | 'Merge' >> beam.CombineGlobally(_Merge(self._params.model)))

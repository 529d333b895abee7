"""One tuning trial (no Beam): the search space of each mode (from the table of
wals_core/defaults.py), and training one parameter set with wals_core's in-memory
trainer, scored on the validation pairs.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from wals_core import objectives
from wals_core.defaults import Range, model_defaults, search_ranges  # noqa: F401
from wals_core.models import get_model, model_names
from wals_core.params import WalsParams
from wals_core.ranking import rank_and_score
from wals_core.sums import sum_of_squares
from wals_core.train import Problem, fit

from pipeline.tuning.data import TuneData

RANK_K = 10   # the ndcg metric is NDCG@10


# The tuner's ranges of each mode, from the table of parameters (wals_core/defaults.py)
# as are the modes' defaults (trial 0 and every unsearched value).
SPACES: dict[str, dict[str, Range]] = {model: search_ranges(model)
                                        for model in model_names()}


def search_space(model: str, wt_type: str = 'linear', confidence: str = 'log'
                 ) -> dict[str, Range]:
    """The parameters searched for a mode, in table order. wals searches the weight
    parameter of its wt_type only; implicit searches epsilon only for log confidence."""
    return get_model(model).search_space(wt_type, confidence)


def default_trial(model: str, space: dict[str, Range]) -> dict:
    defaults = model_defaults(model)
    return {name: defaults[name] for name in space}


@dataclasses.dataclass(frozen=True)
class TrialSettings:
    """What every trial shares: the mode, the metric and the fixed parameters."""
    model: str
    metric: str                  # 'rmse' or 'ndcg'
    num_iters: int
    seed: int                    # the trainer's --seed (initial factors)
    wt_type: str = 'linear'
    confidence: str = 'log'
    scale_regularization: bool = True   # implicit: λ·n_i (the trainer's default)
    implicit_data: bool = False  # web_views: relevance threshold 0
    relevance_threshold: float | None = None
    solver: str = 'exact'        # the trainer's --solver and --cg_steps
    cg_steps: int = 3

    def params(self, searched: dict) -> WalsParams:
        values = dict(model_defaults(self.model), num_iters=self.num_iters, **searched)
        values['latent_factors'] = int(values['latent_factors'])
        values.update(wt_type=self.wt_type, confidence=self.confidence,
                      solver=self.solver, cg_steps=self.cg_steps,
                      scale_regularization=self.scale_regularization
                      and get_model(self.model).uses('scale_regularization'))
        return WalsParams(**values)


def metric_name(metric: str) -> str:
    return 'rmse' if metric == 'rmse' else f'ndcg_at_{RANK_K}'


def validation_rmse(data: TuneData, problem: Problem, u: np.ndarray, v: np.ndarray,
                    params: WalsParams) -> float:
    """RMSE on the validation pairs; explicit predictions are clipped to the range
    of the training ratings (a rating outside it is never right)."""
    clip = None
    if get_model(params.model).clips_predictions:
        clip = (float(data.train_values.min()), float(data.train_values.max()))
    pred = objectives.predict(data.val_rows.astype(np.int64), data.val_cols.astype(np.int64),
                              u, v, params, problem.global_mean, clip=clip)
    err = data.val_values - pred
    # A fixed-order sum: trials run in threads that share one process-wide BLAS
    # thread limit, so a BLAS dot product here would vary from run to run.
    return math.sqrt(sum_of_squares(err) / len(err))


def relevance_threshold(settings: TrialSettings, problem: Problem) -> float:
    """Validation ratings at or above this are relevant: the trainer's rule (0 for
    implicit data, else the mean training rating) unless given."""
    if settings.relevance_threshold is not None:
        return settings.relevance_threshold
    if settings.implicit_data or get_model(settings.model).implicit_feedback:
        return 0.0
    return problem.global_mean


def validation_ndcg(data: TuneData, problem: Problem, u: np.ndarray, v: np.ndarray,
                    params: WalsParams, threshold: float) -> float:
    """NDCG@10 over the users with relevant validation items, ranking every item
    but the user's training items (wals_core.ranking.rank_and_score)."""
    relevant = data.val_values >= threshold
    k = params.latent_factors
    offsets = v[:, k] if objectives.has_bias(params) else None
    sums = rank_and_score(u[:, :k], v[:, :k], RANK_K, data.val_rows[relevant],
                          data.val_cols[relevant], problem.by_row.indptr,
                          problem.by_row.indices, item_offsets=offsets)
    return sums.summary()['ndcg_at_k'] if sums.users else float('nan')


def train_and_score(trial: dict, data: TuneData, settings: TrialSettings) -> dict:
    """Trains one trial ({'number', 'params'}) on the trial training pairs and scores
    it on the validation pairs. Returns {'number', 'value', 'seconds', 'error'}:
    value is None when training failed or diverged (error says why)."""
    started = time.time()
    value, error = None, None
    try:
        params = settings.params(trial['params'])
        with np.errstate(all='ignore'):   # divergence shows as a non-finite value
            problem, u, v = fit(data.train_rows, data.train_cols, data.train_values,
                                data.user_hashes, data.item_hashes, params, settings.seed)
        if not (np.all(np.isfinite(u)) and np.all(np.isfinite(v))):
            error = 'training diverged (non-finite factors)'
        elif settings.metric == 'rmse':
            value = validation_rmse(data, problem, u, v, params)
        else:
            value = validation_ndcg(data, problem, u, v, params,
                                    relevance_threshold(settings, problem))
        if value is not None and not math.isfinite(value):
            error, value = f'{metric_name(settings.metric)} is {value}', None
    except (ArithmeticError, np.linalg.LinAlgError, ValueError) as e:
        error = f'{type(e).__name__}: {e}'
    return {'number': trial['number'], 'value': value, 'error': error,
            'seconds': round(time.time() - started, 3)}

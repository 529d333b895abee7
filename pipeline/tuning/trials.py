"""One tuning trial (no Beam): the search space of each mode, and training one
parameter set with wals_core's in-memory trainer, scored on the validation pairs.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from wals_core import objectives
from wals_core.params import WalsParams
from wals_core.ranking import rank_and_score
from wals_core.sums import sum_of_squares
from wals_core.train import Problem, fit

from pipeline.options import MODE_DEFAULTS as TRAINER_MODE_DEFAULTS, WALS_DEFAULTS
from pipeline.tuning.data import TuneData

RANK_K = 10   # the ndcg metric is NDCG@10


@dataclasses.dataclass(frozen=True)
class Range:
    """A searched parameter: log-uniform in [low, high] (integers for k)."""
    low: float
    high: float
    integer: bool = False


# Log-uniform ranges around each mode's defaults (README "Tuning"): a decade or two
# either side, and for wals the original's --use_optimized values inside them.
_K_SMALL = Range(2, 64, integer=True)
SPACES: dict[str, dict[str, Range]] = {
    'wals': {'latent_factors': _K_SMALL, 'regularization': Range(1e-3, 100.0),
             'unobs_weight': Range(1e-4, 1.0),
             'feature_wt_factor': Range(1.0, 1000.0),   # linear weights
             'feature_wt_exp': Range(0.01, 10.0)},      # log weights
    'implicit': {'latent_factors': Range(4, 128, integer=True),
                 'regularization': Range(1e-3, 10.0),   # scaled by counts (λ·n_i)
                 'alpha': Range(0.01, 100.0), 'epsilon': Range(0.01, 100.0)},
    'explicit': {'latent_factors': _K_SMALL, 'regularization': Range(1e-3, 10.0)},
}

# The CLI defaults of each mode (INTERFACES.md): trial 0 and every unsearched value.
_MODE_KEYS = {
    'wals': ('latent_factors', 'num_iters', 'regularization', 'unobs_weight',
             'feature_wt_factor', 'feature_wt_exp'),
    'implicit': ('latent_factors', 'num_iters', 'regularization', 'alpha', 'epsilon'),
    'explicit': ('latent_factors', 'num_iters', 'regularization'),
}
MODE_DEFAULTS: dict[str, dict] = {
    mode: {k: {**WALS_DEFAULTS, **TRAINER_MODE_DEFAULTS[mode]}[k] for k in keys}
    for mode, keys in _MODE_KEYS.items()}


def search_space(model: str, wt_type: str = 'linear', confidence: str = 'log'
                 ) -> dict[str, Range]:
    """The parameters searched for a mode, in table order. wals searches the weight
    parameter of its wt_type only; implicit searches epsilon only for log confidence."""
    space = dict(SPACES[model])
    if model == 'wals':
        space.pop('feature_wt_exp' if wt_type == 'linear' else 'feature_wt_factor')
    if model == 'implicit' and confidence == 'linear':
        space.pop('epsilon')
    return space


def default_trial(model: str, space: dict[str, Range]) -> dict:
    return {name: MODE_DEFAULTS[model][name] for name in space}


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
        values = dict(MODE_DEFAULTS[self.model], num_iters=self.num_iters, **searched)
        values['latent_factors'] = int(values['latent_factors'])
        return WalsParams(model=self.model, wt_type=self.wt_type,
                          confidence=self.confidence,
                          scale_regularization=self.scale_regularization
                          and self.model == 'implicit', solver=self.solver,
                          cg_steps=self.cg_steps, **values)


def metric_name(metric: str) -> str:
    return 'rmse' if metric == 'rmse' else f'ndcg_at_{RANK_K}'


def validation_rmse(data: TuneData, problem: Problem, u: np.ndarray, v: np.ndarray,
                    params: WalsParams) -> float:
    """RMSE on the validation pairs; explicit predictions are clipped to the range
    of the training ratings (a rating outside it is never right)."""
    clip = None
    if params.model == 'explicit':
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
    if settings.implicit_data or settings.model == 'implicit':
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

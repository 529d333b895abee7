"""One tuning trial (no Beam): the search space of each mode, and training one
parameter set with wals_core's in-memory trainer, scored on the validation pairs.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from wals_core import objectives
from wals_core.init import initial_factors
from wals_core.params import WalsParams
from wals_core.ranking import ranking_sums
from wals_core.topk import top_k
from wals_core.train import Problem, initial_state, train

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

    def params(self, searched: dict) -> WalsParams:
        values = dict(MODE_DEFAULTS[self.model], num_iters=self.num_iters, **searched)
        values['latent_factors'] = int(values['latent_factors'])
        return WalsParams(model=self.model, wt_type=self.wt_type,
                          confidence=self.confidence,
                          scale_regularization=self.scale_regularization
                          and self.model == 'implicit', **values)


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
    return math.sqrt(float(err @ err) / len(err))


def _csr_by_row(rows: np.ndarray, cols: np.ndarray, n: int
                ) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((cols, rows))
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return indptr, np.asarray(cols, np.int64)[order]


def _select_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The CSR of the given rows only (in the given order)."""
    lengths = np.diff(indptr)[rows]
    out_ptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=out_ptr[1:])
    # Position of every output entry in `indices`: its row's start plus its rank.
    starts = np.repeat(indptr[rows] - out_ptr[:-1], lengths)
    return out_ptr, np.asarray(indices)[starts + np.arange(out_ptr[-1])]


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
    but the user's training items (wals_core.topk + wals_core.ranking)."""
    relevant = data.val_values >= threshold
    rel_rows = data.val_rows[relevant].astype(np.int64)
    rel_cols = data.val_cols[relevant].astype(np.int64)
    users = np.unique(rel_rows)
    if not len(users):
        return float('nan')
    rel_ptr, rel_idx = _csr_by_row(np.searchsorted(users, rel_rows), rel_cols, len(users))
    ex_ptr, ex_idx = _select_rows(problem.by_row.indptr.astype(np.int64),
                                  problem.by_row.indices, users)
    k = params.latent_factors
    offsets = v[:, k] if objectives.has_bias(params) else None
    ids, _ = top_k(u[users, :k], v[:, :k], RANK_K, exclude_indptr=ex_ptr,
                   exclude_indices=ex_idx, item_offsets=offsets)
    return ranking_sums(ids, rel_ptr, rel_idx, RANK_K).summary()['ndcg_at_k']


def train_and_score(trial: dict, data: TuneData, settings: TrialSettings) -> dict:
    """Trains one trial ({'number', 'params'}) on the trial training pairs and scores
    it on the validation pairs. Returns {'number', 'value', 'seconds', 'error'}:
    value is None when training failed or diverged (error says why)."""
    started = time.time()
    value, error = None, None
    try:
        params = settings.params(trial['params'])
        problem = Problem.build(data.train_rows, data.train_cols, data.train_values,
                                data.num_users, data.num_items, params)
        u0, v0 = initial_state(
            initial_factors(data.user_hashes, params.latent_factors, settings.seed, 'row'),
            initial_factors(data.item_hashes, params.latent_factors, settings.seed, 'col'),
            params)
        with np.errstate(all='ignore'):   # divergence shows as a non-finite value
            u, v = train(problem, params, u0, v0)
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

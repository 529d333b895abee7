"""The models (`--model`), one class each, looked up by name in one registry.

A model carries everything that differs between objectives: its parameters and
defaults (from the table of wals_core/defaults.py), its weights or confidences, the
inputs of the blocked solver, its objective, what its evaluation means (RMSE or not,
clipped or not, which ranking threshold), its tuner ranges and the layout of its
files (a bias column). Code elsewhere asks the model object (`get_model(name)`),
never compares the model's name. Adding a model is one class and one `register`.

The numbers are vectorized: every method takes and returns whole arrays (a block's
entries, a slice of them); none loops over ratings. objectives.py holds the steps
that all models share and calls these methods.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from wals_core.defaults import PARAMETER, Range, model_defaults, search_ranges
from wals_core.solve import RowSolver
from wals_core.sparse import Csr
from wals_core.sums import fixed_dot
from wals_core.weights import column_weights, row_weights

if TYPE_CHECKING:
    from wals_core.params import WalsParams


def confidence(values: np.ndarray, params: WalsParams) -> np.ndarray:
    """alpha · g(|r|) for the implicit mode (float64): the confidence above 1."""
    r = np.abs(np.asarray(values, dtype=np.float64))
    g = np.log1p(r / params.epsilon) if params.confidence == 'log' else r
    return params.alpha * g


def preference(values: np.ndarray) -> np.ndarray:
    """p_ij of the implicit mode: 1 where r > 0, else 0 (float64)."""
    return (np.asarray(values, dtype=np.float64) > 0).astype(np.float64)


class Model:
    """What every model says about itself; subclasses set the facts and the math."""
    name: ClassVar[str] = ''
    # Factor matrices carry a bias column after the k factors; the model folder then
    # holds row_bias.npy, col_bias.npy and global_mean.npy.
    has_bias: ClassVar[bool] = False
    # Predictions are ratings, so (test) RMSE means something; else metrics show null.
    predicts_ratings: ClassVar[bool] = True
    # RMSE is of predictions clipped to the training ratings' range.
    clips_predictions: ClassVar[bool] = False
    # Its RMSE is the original trainer's (wals_core.metrics.squared_error, unclipped).
    original_rmse: ClassVar[bool] = False
    # Every positive test value is relevant (ranking threshold 0): implicit feedback.
    implicit_feedback: ClassVar[bool] = False
    # ModelCheck: why every vector is zero when no training entry has a target.
    no_target_message: ClassVar[str | None] = None

    # -- parameters, defaults, tuning -------------------------------------------
    def uses(self, option: str) -> bool:
        """True when `option` (a name of wals_core/defaults.py) is this model's."""
        return self.name in PARAMETER[option].models

    def defaults(self) -> dict[str, Any]:
        """Every WalsParams field's default under this model (wt_type: for ratings)."""
        return model_defaults(self.name)

    @property
    def default_metric(self) -> str:
        """The tuner's and the gate's metric: rmse, or ndcg without ratings."""
        return 'rmse' if self.predicts_ratings else 'ndcg'

    def search_space(self, wt_type: str, confidence: str) -> dict[str, Range]:
        """The tuner's ranges, in table order, for this weight type and confidence."""
        return search_ranges(self.name)

    def fixed_tune_options(self, wt_type: str, confidence: str) -> dict[str, str]:
        """The options a search holds fixed that the trainer must be given too."""
        return {}

    # -- the solver and the objective -------------------------------------------
    def counts_scale_regularization(self, p: WalsParams) -> bool:
        """True when λ is multiplied by each row's training-rating count (ALS-WR)."""
        return False

    def make_solver(self, train: Csr, side: str, p: WalsParams, col_counts: np.ndarray,
                    start: int, other_rows: int, global_mean: float,
                    other_index: np.ndarray | None, needed: int,
                    solver_options: dict) -> RowSolver:
        """objectives.make_solver's RowSolver (needed: rows of the other side given)."""
        raise NotImplementedError

    def initial_matrix(self, f: np.ndarray, p: WalsParams) -> np.ndarray:
        """Stored initial factors from float32 N(0, 1) draws: scaled by 1/sqrt(k)
        (unit expected norm, as Spark and `implicit` start small), with a zero bias
        column where the model has one."""
        f = (f / np.float32(np.sqrt(p.latent_factors))).astype(np.float32)
        if self.has_bias:
            f = np.concatenate([f, np.zeros((len(f), 1), np.float32)], axis=1)
        return f

    def weight_table(self, p: WalsParams, col_counts: np.ndarray) -> np.ndarray | None:
        """What entry_weights looks up per column, worked out once per block's
        ObjectiveTerms (None: nothing)."""
        return None

    def entry_weights(self, p: WalsParams, cols: np.ndarray, values: np.ndarray,
                      table: np.ndarray | None) -> np.ndarray | None:
        """Per training entry (of a slice), the part of its objective term that the
        factors never change (ObjectiveTerms.entries); table: weight_table's."""
        return None

    def objective(self, p: WalsParams, u: np.ndarray, v: np.ndarray, rows: np.ndarray,
                  cols: np.ndarray, a: np.ndarray, dot: np.ndarray, reg: float,
                  global_mean: float, by_row: Csr, col_counts: np.ndarray) -> float:
        """objectives.objective once the shared terms are computed."""
        raise NotImplementedError

    def slice_terms(self, p: WalsParams, a: np.ndarray, dot: np.ndarray,
                    row_bias: np.ndarray | None, col_bias: np.ndarray | None,
                    global_mean: float, weight) -> tuple[float, float]:
        """(objective terms, squared error) of one slice of a block's entries: its
        values, u_i·v_j and (with a bias) b_i and c_j per entry, all float64."""
        raise NotImplementedError

    def unobserved_weight(self, p: WalsParams) -> float:
        """The weight of every pair in Σ_all (u_i·v_j)²."""
        raise NotImplementedError

    def global_terms(self, p: WalsParams, row_gramian: np.ndarray,
                     col_gramian: np.ndarray, reg: float) -> float:
        """objectives.global_objective given its regularization term."""
        k = p.latent_factors
        all_pairs = float(np.sum(np.asarray(row_gramian)[:k, :k]
                                 * np.asarray(col_gramian)[:k, :k]))
        return self.unobserved_weight(p) * all_pairs + reg

    def target_entries(self, values: np.ndarray, global_mean: float) -> np.ndarray:
        """bool per training entry (float64 values): its target is not zero."""
        return values != 0


class Wals(Model):
    """The original TF WALS objective: an observed entry weighs w0 + R_i C_j (C_j from
    item popularity, weights.py), every unobserved one w0; target A_ij; λ."""
    name = 'wals'
    original_rmse = True
    no_target_message = 'every training rating is 0, so every vector is zero'

    def search_space(self, wt_type: str, confidence: str) -> dict[str, Range]:
        """Searches the weight parameter of its wt_type only."""
        space = search_ranges(self.name)
        space.pop('feature_wt_exp' if wt_type == 'linear' else 'feature_wt_factor')
        return space

    def fixed_tune_options(self, wt_type: str, confidence: str) -> dict[str, str]:
        return {'wt_type': wt_type}

    def make_solver(self, train, side, p, col_counts, start, other_rows, global_mean,
                    other_index, needed, solver_options):
        n = train.num_rows
        if side == 'row':
            own, full = row_weights(n, p), column_weights(col_counts, p)
        else:
            own = column_weights(col_counts[start:start + n], p)
            full = row_weights(other_rows if other_index is None else 1, p)
        others, signs = full, None
        if other_index is not None:
            others = full[other_index] if side == 'row' else np.repeat(full, needed)
            signs = (bool(np.all(full > 0)), bool(np.any(full < 0)))
        return RowSolver(train, own, others, p.unobs_weight, p.regularization,
                         p.latent_factors, other_signs=signs, **solver_options)

    def initial_matrix(self, f, p):
        return f     # the original's draws, unchanged

    def weight_table(self, p, col_counts):
        # R_i is one number for every row (weights.row_weights), so R_i C_j is a
        # table by column: w0 + take(R C, cols) is w0 + R[rows] * C[cols], bit for bit.
        return row_weights(1, p)[0] * column_weights(col_counts, p)

    def entry_weights(self, p, cols, values, table):
        return p.unobs_weight + np.take(table, cols)

    def objective(self, p, u, v, rows, cols, a, dot, reg, global_mean, by_row, col_counts):
        k = p.latent_factors
        gram = np.sum((u[:, :k].T @ u[:, :k]) * (v[:, :k].T @ v[:, :k]))
        cw = column_weights(col_counts, p)
        rw = row_weights(by_row.num_rows, p)
        w0 = p.unobs_weight
        observed = np.sum((w0 + rw[rows] * cw[cols]) * (a - dot) ** 2)
        return float(observed + w0 * (gram - np.sum(dot ** 2)) + reg)

    def slice_terms(self, p, a, dot, row_bias, col_bias, global_mean, weight):
        err = a - dot
        e2 = fixed_dot(err, err)
        return (float(np.sum(weight * err * err))
                - p.unobs_weight * fixed_dot(dot, dot)), e2

    def unobserved_weight(self, p):
        return p.unobs_weight


class Implicit(Model):
    """Hu, Koren & Volinsky (2008), as `implicit` and Spark's implicitPrefs: every pair
    has preference p_ij (1 for an observed rating > 0, else 0) and confidence
    1 + alpha · g(|r_ij|); an unobserved pair has p = 0 and confidence 1. As solver
    inputs: w0 = 1, R = C = 1, per-entry weights E_ij = alpha · g(|r_ij|), target p_ij."""
    name = 'implicit'
    predicts_ratings = False
    implicit_feedback = True
    no_target_message = ('no training rating is positive: --model implicit learns from '
                         'positive values (plays, clicks, views), so every vector is zero')

    def search_space(self, wt_type: str, confidence: str) -> dict[str, Range]:
        """Searches epsilon only for log confidence."""
        space = search_ranges(self.name)
        if confidence == 'linear':
            space.pop('epsilon')
        return space

    def fixed_tune_options(self, wt_type: str, confidence: str) -> dict[str, str]:
        return {'confidence': confidence}

    def counts_scale_regularization(self, p):
        return p.scale_regularization

    def make_solver(self, train, side, p, col_counts, start, other_rows, global_mean,
                    other_index, needed, solver_options):
        ones_own, ones_other = np.ones(train.num_rows), np.ones(needed)
        signs = None if other_index is None else (True, False)
        block = Csr(train.indptr, train.indices, preference(train.values))
        per_row = p.regularization * np.diff(train.indptr).astype(np.float64) \
            if p.scale_regularization else None
        return RowSolver(block, ones_own, ones_other, 1.0, p.regularization,
                         p.latent_factors, entry_weights=confidence(train.values, p),
                         row_regularization=per_row, other_signs=signs, **solver_options)

    def entry_weights(self, p, cols, values, table):
        return confidence(values, p)

    def objective(self, p, u, v, rows, cols, a, dot, reg, global_mean, by_row, col_counts):
        k = p.latent_factors
        gram = np.sum((u[:, :k].T @ u[:, :k]) * (v[:, :k].T @ v[:, :k]))
        pref, conf = preference(a), confidence(a, p)
        observed = np.sum((1.0 + conf) * (pref - dot) ** 2)
        return float(observed + gram - np.sum(dot ** 2) + reg)

    def slice_terms(self, p, a, dot, row_bias, col_bias, global_mean, weight):
        err = preference(a) - dot
        e2 = fixed_dot(err, err)
        return float(np.sum(weight * err * err)) + e2 - fixed_dot(dot, dot), e2

    def unobserved_weight(self, p):
        return 1.0

    def target_entries(self, values, global_mean):
        return values > 0


class Explicit(Model):
    """Biased ALS-WR: observed entries only (w0 = 0, weight 1), target r_ij - μ, per-row
    λ · n_i, and per-user and per-item biases learned in the same solves through an
    augmented column (objectives.py). Prediction: μ + b_i + c_j + u_i · v_j."""
    name = 'explicit'
    has_bias = True
    clips_predictions = True

    def counts_scale_regularization(self, p):
        return True

    def make_solver(self, train, side, p, col_counts, start, other_rows, global_mean,
                    other_index, needed, solver_options):
        ones_own, ones_other = np.ones(train.num_rows), np.ones(needed)
        signs = None if other_index is None else (True, False)
        block = Csr(train.indptr, train.indices,
                    np.asarray(train.values, np.float64) - global_mean)
        per_row = p.regularization * np.diff(train.indptr).astype(np.float64)
        return RowSolver(block, ones_own, ones_other, 0.0, p.regularization,
                         p.latent_factors + 1, row_regularization=per_row, offsets=True,
                         other_signs=signs, **solver_options)

    def objective(self, p, u, v, rows, cols, a, dot, reg, global_mean, by_row, col_counts):
        k = p.latent_factors
        err = a - (global_mean + u[rows, k] + v[cols, k] + dot)
        return float(err @ err + reg)

    def slice_terms(self, p, a, dot, row_bias, col_bias, global_mean, weight):
        err = a - (global_mean + row_bias + col_bias + dot)
        e2 = fixed_dot(err, err)
        return e2, e2

    def unobserved_weight(self, p):
        return 0.0

    def global_terms(self, p, row_gramian, col_gramian, reg):
        return reg     # observed entries only

    def target_entries(self, values, global_mean):
        return values != global_mean


_REGISTRY: dict[str, Model] = {}


def register(model: Model) -> Model:
    """Makes `model` the one answer of get_model(model.name)."""
    if model.name in _REGISTRY:
        raise ValueError(f'model {model.name!r} is registered already')
    _REGISTRY[model.name] = model
    return model


for _model in (Wals(), Implicit(), Explicit()):
    register(_model)


def get_model(name: str) -> Model:
    """The model called `name` (ValueError naming the known ones otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f'unknown model {name!r} (expected one of '
                         f'{", ".join(_REGISTRY)})') from None


def model_names() -> tuple[str, ...]:
    """The registered models, in registration order."""
    return tuple(_REGISTRY)

"""Model parameters: names, defaults and tuned sets of the original TF trainer.

Names and defaults follow Google's tensorflow-recommendation-wals `task.py` /
`model.py` so that its users can switch command lines without surprises.
"""
from __future__ import annotations

import dataclasses

import numpy as np

LOG_RATINGS = 0      # the original's constant: log weights, C_j = (1/n_j) ** feature_wt_exp
LINEAR_RATINGS = 1   # the original's constant: linear weights, C_j = feature_wt_factor / n_j

DATA_TYPES = ('ratings', 'web_views')
MODELS = ('wals', 'implicit', 'explicit')
SOLVERS = ('exact', 'cg')

# The original's `--use-optimized` hyperparameter sets (from its tuning runs).
OPTIMIZED = {
    'ratings': dict(latent_factors=34, regularization=9.83, unobs_weight=0.001,
                    feature_wt_factor=189.8),
    'web_views': dict(latent_factors=30, regularization=7.27, unobs_weight=0.01,
                      feature_wt_exp=5.05),
}


@dataclasses.dataclass(frozen=True)
class WalsParams:
    """Hyperparameters of the WALS model (see README "The math")."""
    latent_factors: int = 5
    num_iters: int = 20
    regularization: float = 0.07
    unobs_weight: float = 0.01
    weights: bool = True
    wt_type: str = 'linear'          # 'linear' or 'log'
    feature_wt_factor: float = 130.0
    feature_wt_exp: float = 0.08
    # The objective (wals_core/objectives.py) and the implicit mode's confidence.
    model: str = 'wals'               # 'wals', 'implicit' or 'explicit'
    alpha: float = 1.0                # implicit: confidence 1 + alpha * g(r)
    epsilon: float = 1.0              # implicit, log confidence: g(r) = log1p(r / epsilon)
    confidence: str = 'log'           # implicit: 'log' or 'linear' (g(r) = r)
    scale_regularization: bool = False  # implicit: λ·n_i per row (as Spark) instead of λ
    # The half-step solver (wals_core/solve.py, wals_core/cg.py): 'exact' (default;
    # TF parity) or 'cg': cg_steps conjugate-gradient steps per row, warm-started
    # from the row's factors of the previous iteration (approximate, faster).
    solver: str = 'exact'
    cg_steps: int = 3

    def __post_init__(self) -> None:
        if self.wt_type not in ('linear', 'log'):
            raise ValueError(f"wt_type must be 'linear' or 'log', got {self.wt_type!r}")
        if self.model not in MODELS:
            raise ValueError(f'model must be one of {", ".join(MODELS)}, got {self.model!r}')
        if self.confidence not in ('log', 'linear'):
            raise ValueError(f"confidence must be 'log' or 'linear', got {self.confidence!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be 'exact' or 'cg', got {self.solver!r}")
        if (isinstance(self.cg_steps, bool) or not isinstance(self.cg_steps, (int, np.integer))
                or self.cg_steps < 1):
            raise ValueError(f'cg_steps must be an integer >= 1, got {self.cg_steps!r}')

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_wt_type(data_type: str) -> str:
    """The original used linear weights for ratings and log weights for web views."""
    return 'log' if data_type == 'web_views' else 'linear'


def parse_wt_type(value: str | int) -> str:
    """Accepts 'log' / 'linear' or the original's numeric codes (0 = log, 1 = linear)."""
    text = str(value).strip().lower()
    if text in ('log', str(LOG_RATINGS)):
        return 'log'
    if text in ('linear', str(LINEAR_RATINGS)):
        return 'linear'
    raise ValueError(f"wt_type must be log, linear, 0 (log) or 1 (linear), got {value!r}")

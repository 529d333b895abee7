"""Model parameters: the WalsParams record (its defaults: wals_core/defaults.py).

Names and defaults follow Google's tensorflow-recommendation-wals `task.py` /
`model.py` so that its users can switch command lines without surprises.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from wals_core.defaults import (CONFIDENCES, DATA_TYPES, LINEAR_RATINGS, LOG_RATINGS,  # noqa: F401
                                MODELS, OPTIMIZED, SOLVERS, WT_TYPES, default_wt_type,
                                param_defaults, parse_wt_type)

# The field defaults come from the one table of parameters (wals_core/defaults.py).
_DEFAULT = param_defaults()


@dataclasses.dataclass(frozen=True)
class WalsParams:
    """Hyperparameters of the WALS model (see README "The math")."""
    latent_factors: int = _DEFAULT['latent_factors']
    num_iters: int = _DEFAULT['num_iters']
    regularization: float = _DEFAULT['regularization']
    unobs_weight: float = _DEFAULT['unobs_weight']
    weights: bool = _DEFAULT['weights']
    wt_type: str = _DEFAULT['wt_type']                # 'linear' or 'log'
    feature_wt_factor: float = _DEFAULT['feature_wt_factor']
    feature_wt_exp: float = _DEFAULT['feature_wt_exp']
    # The objective (wals_core/objectives.py) and the implicit mode's confidence.
    model: str = _DEFAULT['model']                    # 'wals', 'implicit' or 'explicit'
    alpha: float = _DEFAULT['alpha']                  # implicit: confidence 1 + alpha * g(r)
    epsilon: float = _DEFAULT['epsilon']              # implicit: g(r) = log1p(r / epsilon)
    confidence: str = _DEFAULT['confidence']          # implicit: 'log' or 'linear' (g(r) = r)
    # implicit: λ·n_i per row (as Spark) instead of λ; the implicit mode's default is
    # true (model_defaults), the field's false.
    scale_regularization: bool = _DEFAULT['scale_regularization']
    # The half-step solver (wals_core/solve.py, wals_core/cg.py): 'exact' (default;
    # TF parity) or 'cg': cg_steps conjugate-gradient steps per row, warm-started
    # from the row's factors of the previous iteration (approximate, faster).
    solver: str = _DEFAULT['solver']
    cg_steps: int = _DEFAULT['cg_steps']

    def __post_init__(self) -> None:
        if self.wt_type not in WT_TYPES:
            raise ValueError(f"wt_type must be 'linear' or 'log', got {self.wt_type!r}")
        if self.model not in MODELS:
            raise ValueError(f'model must be one of {", ".join(MODELS)}, got {self.model!r}')
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be 'log' or 'linear', got {self.confidence!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be 'exact' or 'cg', got {self.solver!r}")
        if (isinstance(self.cg_steps, bool) or not isinstance(self.cg_steps, (int, np.integer))
                or self.cg_steps < 1):
            raise ValueError(f'cg_steps must be an integer >= 1, got {self.cg_steps!r}')

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)



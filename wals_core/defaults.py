"""The model parameters, written once: name, spellings, type, default (per model where
it differs), help text, choices and the tuner's search range.

Everything else is generated from this table: WalsParams' field defaults
(wals_core/params.py), each model's defaults, the tuner's search space
(pipeline/tuning/trials.py), the trainer's and the tuner's argparse options (hence
`--help`, pipeline/option_table.py) and the options table of docs/options.md
(scripts/options_table.py). The pipeline-only options (input, output, blocks, the
model root...) are in pipeline/option_table.py, built from the same Option class.
No Beam here: the tuner and wals_core read it too.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Mapping

MODELS = ('wals', 'implicit', 'explicit')
DATA_TYPES = ('ratings', 'web_views')
SOLVERS = ('exact', 'cg')
WT_TYPES = ('linear', 'log')
CONFIDENCES = ('log', 'linear')

LOG_RATINGS = 0      # the original's constant: log weights, C_j = (1/n_j) ** feature_wt_exp
LINEAR_RATINGS = 1   # the original's constant: linear weights, C_j = feature_wt_factor / n_j

# The original's `--use-optimized` hyperparameter sets (from its tuning runs).
OPTIMIZED = {
    'ratings': dict(latent_factors=34, regularization=9.83, unobs_weight=0.001,
                    feature_wt_factor=189.8),
    'web_views': dict(latent_factors=30, regularization=7.27, unobs_weight=0.01,
                      feature_wt_exp=5.05),
}


@dataclasses.dataclass(frozen=True)
class Range:
    """A searched parameter: log-uniform in [low, high] (integers for k)."""
    low: float
    high: float
    integer: bool = False


@dataclasses.dataclass(frozen=True)
class Option:
    """One option. `default` is what argparse stores when the option is absent (None:
    decided later, by the model, the data type or the runner; `default_text` then says
    how). A model parameter (`param`) also has `value`, its WalsParams field default,
    and `by_model`, the models whose default differs from it."""
    name: str
    help: str
    group: str
    type: Callable | None = None
    default: Any = None
    default_text: str | None = None     # --help's "Default: ..." and the docs' column
    choices: tuple | None = None
    flag: bool = False                  # store_true
    aliases: tuple[str, ...] = ()       # spellings besides --name and --dashed-name
    dashed: bool = True                 # --dashed-name is accepted too
    param: bool = False                 # a WalsParams field
    value: Any = None                   # param: WalsParams' default
    by_model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    models: tuple[str, ...] = MODELS    # the models the option is a parameter of
    ranges: Mapping[str, Range] = dataclasses.field(default_factory=dict)   # tuner
    cli: bool = True                    # an option of the trainer's command line

    @property
    def flags(self) -> tuple[str, ...]:
        dashed = self.name.replace('_', '-')
        extra = (f'--{dashed}',) if self.dashed and dashed != self.name else ()
        return (f'--{self.name}', *extra, *self.aliases)

    def default_for(self, model: str) -> Any:
        """The parameter's value under `model` when not given."""
        return self.by_model.get(model, self.value)

    def default_description(self) -> str | None:
        """The default as --help and the docs state it."""
        if self.default_text is not None:
            return self.default_text
        if self.flag:
            return None
        if self.param:
            values = {m: self.default_for(m) for m in self.models}
            distinct = list(dict.fromkeys(_text(v) for v in values.values()))
            if len(distinct) == 1:
                return distinct[0]
            return ', '.join(f'{text} ({", ".join(m for m in values if _text(values[m]) == text)})'
                             for text in distinct)
        return None if self.default is None else _text(self.default)

    def help_text(self) -> str:
        described = self.default_description()
        return self.help + (f' Default: {described}.' if described is not None else '')

    def add_to(self, group, **override) -> None:
        """Adds the option to an argparse parser or group; `override` replaces any of
        add_argument's keyword arguments (help, default...)."""
        kwargs: dict[str, Any] = dict(dest=self.name, help=self.help_text())
        if self.flag:
            kwargs['action'] = 'store_true'
        else:
            kwargs['default'] = self.default
            if self.type is not None:
                kwargs['type'] = self.type
            if self.choices is not None:
                kwargs['choices'] = self.choices
        kwargs.update(override)
        # argparse formats help with %: a literal percent sign is written %%
        kwargs['help'] = kwargs['help'].replace('%', '%%') if kwargs['help'] else None
        group.add_argument(*self.flags, **kwargs)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, float) and abs(value) >= 1e6:
        return f'{value:g}'
    return str(value)


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case) as a bool; argparse's type= for flags."""
    value = str(text).strip().lower()
    if value in ('1', 'true', 'yes', 'y', 'on'):
        return True
    if value in ('0', 'false', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


def parse_wt_type(value: str | int) -> str:
    """Accepts 'log' / 'linear' or the original's numeric codes (0 = log, 1 = linear)."""
    text = str(value).strip().lower()
    if text in ('log', str(LOG_RATINGS)):
        return 'log'
    if text in ('linear', str(LINEAR_RATINGS)):
        return 'linear'
    raise ValueError(f"wt_type must be log, linear, 0 (log) or 1 (linear), got {value!r}")


def default_wt_type(data_type: str) -> str:
    """The original used linear weights for ratings and log weights for web views."""
    return 'log' if data_type == 'web_views' else 'linear'


def _optimized_text() -> str:
    return '; '.join(f'{data_type}: ' + ', '.join(f'{k} {v}' for k, v in values.items())
                     for data_type, values in OPTIMIZED.items())


_K_SMALL = Range(2, 64, integer=True)
_MODEL = 'model (names and defaults of the original trainer)'
_OBJECTIVE = 'objective (--model) and its parameters'

# Tuner ranges: log-uniform around each mode's defaults (docs "Tuning"), a decade or two
# either side, and for wals the original's --use_optimized values inside them. The
# tuner searches a mode's ranges in this table's order.
# λ·n_i for implicit, as Spark's implicitPrefs: a plain λ means something else at every
# data size (best 20 on MovieLens 100k, past 100 on the 1m synthetic set), while λ 0.1
# scaled by each row's count is the best of the grids on both (docs "Which --model").
PARAMETERS: tuple[Option, ...] = (
    Option('latent_factors', 'Number of latent factors k.', _MODEL, type=int, param=True,
           value=5, by_model={'implicit': 32, 'explicit': 10},
           ranges={'wals': _K_SMALL, 'implicit': Range(4, 128, integer=True),
                   'explicit': _K_SMALL}),
    Option('num_iters', 'Iterations; one is a row solve then a column solve.', _MODEL,
           type=int, param=True, value=20, by_model={'implicit': 15, 'explicit': 15}),
    Option('regularization', 'L2 regularization λ; explicit (and implicit, see '
           '--scale_regularization) scale it by each row\'s rating count (λ·n_i).', _MODEL,
           type=float, param=True, value=0.07,
           by_model={'implicit': 0.1, 'explicit': 0.1},
           ranges={'wals': Range(1e-3, 100.0), 'implicit': Range(1e-3, 10.0),
                   'explicit': Range(1e-3, 10.0)}),
    Option('unobs_weight', 'wals: weight w0 of every unobserved entry.', _MODEL, type=float,
           param=True, value=0.01, models=('wals',), ranges={'wals': Range(1e-4, 1.0)}),
    Option('weights', 'wals: true: observed entries weigh w0 + C_j from item popularity; '
           'false: every entry weighs w0 (plain ALS).', _MODEL, type=parse_bool, param=True,
           value=True, models=('wals',)),
    Option('wt_type', 'wals: column weight type: linear (C_j = feature_wt_factor / n_j) or '
           'log (C_j = (1/n_j) ** feature_wt_exp); the original\'s codes 0 = log and '
           '1 = linear are accepted (its help text had them backwards).', _MODEL,
           type=parse_wt_type, param=True, value='linear', models=('wals',),
           default_text='linear for ratings, log for web_views'),
    Option('feature_wt_factor', 'wals: linear weight factor.', _MODEL, type=float,
           param=True, value=130.0, models=('wals',),
           ranges={'wals': Range(1.0, 1000.0)}),
    Option('feature_wt_exp', 'wals: log weight exponent.', _MODEL, type=float, param=True,
           value=0.08, models=('wals',), ranges={'wals': Range(0.01, 10.0)}),
    Option('use_optimized', 'wals: start from the original\'s tuned set for the data type '
           f'({_optimized_text()}); options given explicitly still win.', _MODEL, flag=True,
           models=('wals',)),
    Option('model', 'The objective. wals: the original TF WALS objective. implicit: '
           'implicit feedback (play counts, clicks, views): Hu-Koren-Volinsky confidence '
           'weighting, every unobserved pair weighs 1 with preference 0. explicit: ratings '
           '(stars), observed entries only, with a global mean and per-user and per-item '
           'biases, regularization scaled by each row\'s rating count (ALS-WR). Options '
           'given explicitly win over a mode\'s defaults.', _OBJECTIVE, default='wals',
           choices=MODELS, param=True, value='wals'),
    Option('alpha', 'implicit: confidence 1 + alpha * g(r) of an observed pair.', _OBJECTIVE,
           type=float, param=True, value=1.0, models=('implicit',),
           ranges={'implicit': Range(0.01, 100.0)}),
    Option('epsilon', 'implicit, log confidence: g(r) = log1p(r / epsilon).', _OBJECTIVE,
           type=float, param=True, value=1.0, models=('implicit',),
           ranges={'implicit': Range(0.01, 100.0)}),
    Option('scale_regularization', 'implicit: true multiplies λ by each user\'s (item\'s) '
           'rating count, as Spark\'s implicitPrefs does (the same λ then suits small and '
           'large data); false: one λ for every row, as the implicit library.', _OBJECTIVE,
           type=parse_bool, param=True, value=False, by_model={'implicit': True},
           models=('implicit',)),
    Option('confidence', 'implicit: g(r) = log1p(r / epsilon) (log, robust to heavy-tailed '
           'counts) or g(r) = r (linear).', _OBJECTIVE, choices=CONFIDENCES, param=True,
           value='log', models=('implicit',)),
    Option('seed', 'Seed of the initial factors (each ID gets the same vector on any '
           'runner).', _MODEL, type=int, default=0),
    Option('solver', 'How each row\'s k x k system is solved: exact (a batched '
           'Cholesky/LU in float64, as the original; TF parity) or cg (--cg_steps '
           'conjugate-gradient steps per row, warm-started from the row\'s factors of the '
           'previous iteration, as the implicit library: approximate, faster from k of '
           'about 16; docs/math.md "Solvers").', _MODEL, choices=SOLVERS, param=True,
           value='exact'),
    Option('cg_steps', '--solver cg: conjugate-gradient steps per row and half-step.',
           _MODEL, type=int, param=True, value=3),
)

PARAMETER = {o.name: o for o in PARAMETERS}
# The WalsParams fields given by the --use_optimized sets, the mode and the command line.
PARAMS = tuple(o for o in PARAMETERS if o.param)


def param_defaults() -> dict[str, Any]:
    """WalsParams' field defaults (the wals model's, and each other field's one value)."""
    return {o.name: o.value for o in PARAMS}


def model_defaults(model: str) -> dict[str, Any]:
    """Every WalsParams field's default under `model` (wt_type: for ratings)."""
    return {o.name: (model if o.name == 'model' else o.default_for(model)) for o in PARAMS}


def mode_overrides(model: str) -> dict[str, Any]:
    """The parameters whose default under `model` differs from WalsParams' default."""
    return {o.name: o.by_model[model] for o in PARAMS if model in o.by_model}


def search_ranges(model: str) -> dict[str, Range]:
    """The tuner's ranges for `model`, in table order (before the choice of weight
    parameter by wt_type and confidence)."""
    return {o.name: o.ranges[model] for o in PARAMETERS if model in o.ranges}

"""Command-line options of the trainer, and their validation into a TrainConfig.

Names and defaults follow the original TF trainer's task.py; its dashed
spellings (--data-type, --use-optimized, --train-files, --job-dir) work too.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.option_table import (DEFAULT_BLOCK_SIZE, DEFAULT_MAX_ABS_VALUE,  # noqa: F401
                                   DEFAULT_MAX_BROADCAST_MB, DEFAULT_MAX_ID_LENGTH,
                                   DEFAULT_MAX_LINE_BYTES, EXCHANGES, VOCABULARIES,
                                   add_input_options, add_train_arguments)
from wals_core.defaults import (PARAMETER, PARAMS, default_wt_type,  # noqa: F401
                                mode_overrides, parse_bool)
from wals_core.models import get_model
from wals_core.params import OPTIMIZED, WalsParams


class WalsOptions(PipelineOptions):
    """The WALS model and data options (any other Beam option passes through).
    Read them as Beam's examples do: PipelineOptions(argv).view_as(WalsOptions),
    then config_from_options() validates them into a TrainConfig."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_train_arguments(parser)   # pipeline/option_table.py


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    input: str
    output: str
    data_type: str
    delimiter: str
    headers: bool
    params: WalsParams
    test_fraction: float
    split_seed: int
    seed: int
    block_size: int
    max_bad_fraction: float = 0.001
    max_id_length: int = DEFAULT_MAX_ID_LENGTH
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_abs_value: float = DEFAULT_MAX_ABS_VALUE
    vocabulary: str = 'local'   # 'distributed': pipeline/training/distributed_vocab.py
    test_input: str | None = None
    rank_k: int = 10
    relevance_threshold: float | None = None   # None: by the data (EvalConfig.threshold)
    model_root: str | None = None
    previous_model: str | None = None   # a model folder or a root, as given
    no_warm_start: bool = False
    max_regression: float | None = None
    gate_metric: str = 'rmse'
    keep_versions: int | None = None
    tolerance: float = 0.0
    objective_every: int = 1
    eval_every: int = 0
    exchange: str = 'broadcast'
    max_broadcast_mb: float = DEFAULT_MAX_BROADCAST_MB

    def describe(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(out.pop('params'))
        return out


class ConfigError(ValueError):
    """An option value that cannot work; the message says which and why."""


def parse_delimiter(text: str | None, data_type: str) -> str:
    if text is None:
        return ',' if data_type == 'web_views' else '\t'
    named = {'\\t': '\t', 'tab': '\t', 'comma': ',', 'space': ' ', 'pipe': '|',
             'semicolon': ';'}
    value = named.get(text.lower(), text)
    if len(value) != 1 or value in '\r\n':
        raise ConfigError(f'--delimiter must be one character (or "tab", "\\t"), got {text!r}')
    return value


# Largest --block_size: rows are numbered with int32 (pipeline/training/graph.py MAX_ROWS).
MAX_BLOCK_SIZE = 2**31 - 1


def check_finite(**values: float | None) -> None:
    """ConfigError for the first option given as NaN or an infinity (the range checks
    let them through: NaN compares false, inf passes >= 0)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ConfigError(f'--{name} must be a finite number, got {value}')


def check_input_limits(args) -> None:
    """--max_line_bytes and --max_abs_value (the trainer's and the tuner's)."""
    check_finite(max_abs_value=args.max_abs_value)
    if args.max_line_bytes < 1:
        raise ConfigError('--max_line_bytes must be at least 1')
    if not args.max_abs_value > 0:
        raise ConfigError('--max_abs_value must be more than 0')


def check_limits(args, params: WalsParams) -> None:
    """The trainer's options that the range checks of config_from_options let
    through: non-finite numbers, a --block_size past int32, the input limits."""
    check_finite(regularization=params.regularization, unobs_weight=params.unobs_weight,
                 feature_wt_factor=params.feature_wt_factor,
                 feature_wt_exp=params.feature_wt_exp, alpha=params.alpha,
                 epsilon=params.epsilon, relevance_threshold=args.relevance_threshold,
                 max_regression=args.max_regression, tolerance=args.tolerance,
                 max_broadcast_mb=args.max_broadcast_mb)
    if args.block_size > MAX_BLOCK_SIZE:
        raise ConfigError(f'--block_size must be at most {MAX_BLOCK_SIZE:,}')
    check_input_limits(args)


def default_output() -> str:
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')
    return os.path.join('output', f'run-{stamp}')


def config_from_options(options: PipelineOptions) -> TrainConfig:
    """Validated TrainConfig from the WalsOptions view of `options`."""
    args = options.view_as(WalsOptions)
    if not args.input:
        raise ConfigError('--input is required (a ratings file or glob)')
    base = {o.name: o.value for o in PARAMS if o.cli and o.name != 'model'}
    base.update(wt_type=default_wt_type(args.data_type))
    model = get_model(args.model)
    if args.use_optimized:
        if not model.uses('use_optimized'):
            raise ConfigError('--use_optimized holds the original WALS tuning: it needs '
                              '--model wals')
        base.update(OPTIMIZED[args.data_type])
    base.update(mode_overrides(args.model))
    for name in base:
        if getattr(args, name, None) is not None:
            if not model.uses(name):
                owners = ' or '.join(PARAMETER[name].models)
                raise ConfigError(f'--{name} is a parameter of --model {owners}, not of '
                                  f'--model {args.model}')
            base[name] = getattr(args, name)
    if base['cg_steps'] < 1:   # before WalsParams, which would refuse it with a ValueError
        raise ConfigError('--cg_steps must be at least 1')
    params = WalsParams(model=args.model, **base)
    checks = [
        (params.latent_factors >= 1, '--latent_factors must be at least 1'),
        (params.num_iters >= 0, '--num_iters must be 0 or more'),
        (params.regularization >= 0, '--regularization must be 0 or more'),
        (params.unobs_weight >= 0, '--unobs_weight must be 0 or more'),
        (params.feature_wt_factor >= 0, '--feature_wt_factor must be 0 or more'),
        (0 <= args.test_fraction < 1, '--test_fraction must be in [0, 1)'),
        (args.block_size >= 1, '--block_size must be at least 1'),
        (0 <= args.max_bad_fraction <= 1, '--max_bad_fraction must be in [0, 1]'),
        (params.alpha >= 0, '--alpha must be 0 or more'),
        (params.epsilon > 0, '--epsilon must be more than 0'),
        (args.rank_k >= 0, '--rank_k must be 0 or more'),
        (args.max_id_length >= 1, '--max_id_length must be at least 1'),
        (args.tolerance >= 0, '--tolerance must be 0 or more'),
        (args.objective_every >= 0, '--objective_every must be 0 or more'),
        (args.tolerance == 0 or args.objective_every >= 1,
         '--tolerance compares the objective between iterations: it needs '
         '--objective_every 1 or more'),
        (args.eval_every >= 0, '--eval_every must be 0 or more'),
        (args.max_broadcast_mb >= 0, '--max_broadcast_mb must be 0 or more'),
        (args.keep_versions is None or args.keep_versions >= 1,
         '--keep_versions must be at least 1'),
        (args.max_regression is None or args.max_regression >= 0,
         '--max_regression must be 0 or more'),
        (not (args.model_root and args.output), '--model_root and --output exclude each '
         'other: a root publishes to ROOT/versions/<version>/'),
        (args.keep_versions is None or bool(args.model_root),
         '--keep_versions prunes the versions of a --model_root: without one it would '
         'be ignored'),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_limits(args, params)
    gate_metric = args.gate_metric or model.default_metric
    if gate_metric == 'rmse' and not model.predicts_ratings and args.max_regression is not None:
        raise ConfigError(f'--gate_metric rmse does not apply to --model {args.model} (no '
                          'RMSE): use --gate_metric ndcg')
    if gate_metric == 'ndcg' and args.rank_k < 1:
        raise ConfigError('--gate_metric ndcg needs --rank_k 1 or more')
    # With a model root, the version folder is chosen at run time (model_root.py);
    # until then output names the root itself.
    output = args.model_root or args.output or default_output()
    if output.rstrip('/') == args.input.rstrip('/'):
        raise ConfigError('--output must not be the input path')
    if args.test_input and output.rstrip('/') == args.test_input.rstrip('/'):
        raise ConfigError('--output must not be the --test_input path')
    runner = str(options.view_as(StandardOptions).runner or 'DirectRunner')
    exchange = args.exchange or ('auto' if runner.endswith('DataflowRunner') else 'broadcast')
    return TrainConfig(input=args.input, output=output, data_type=args.data_type,
                       delimiter=parse_delimiter(args.delimiter, args.data_type),
                       headers=args.headers, params=params,
                       test_fraction=args.test_fraction, split_seed=args.split_seed,
                       seed=args.seed, block_size=args.block_size,
                       max_bad_fraction=args.max_bad_fraction,
                       max_id_length=args.max_id_length,
                       max_line_bytes=args.max_line_bytes, max_abs_value=args.max_abs_value,
                       vocabulary=args.vocabulary,
                       test_input=args.test_input or None, rank_k=args.rank_k,
                       relevance_threshold=args.relevance_threshold,
                       model_root=args.model_root, previous_model=args.previous_model,
                       no_warm_start=args.no_warm_start, max_regression=args.max_regression,
                       gate_metric=gate_metric, keep_versions=args.keep_versions,
                       tolerance=args.tolerance, objective_every=args.objective_every,
                       eval_every=args.eval_every,
                       exchange=exchange, max_broadcast_mb=args.max_broadcast_mb)

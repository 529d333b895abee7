"""Command-line options of the trainer, and their validation into a TrainConfig.

Names and defaults follow the original TF trainer's task.py; its dashed
spellings (--data-type, --use-optimized, --train-files, --job-dir) work too.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from wals_core.params import (DATA_TYPES, MODELS, OPTIMIZED, SOLVERS, WalsParams,
                              default_wt_type, parse_wt_type)

# Big enough that a block's solve keeps both cores busy and a half-step pays little
# per-block overhead (10M ratings, k=10, 2 cores, back to back: 2048 -> 0.97 s per
# iteration, 8192 -> 0.80 s, 65536 -> 0.68 s); lower it for more parallel tasks on
# many workers.
DEFAULT_BLOCK_SIZE = 16384
# IDs are stored as fixed-width text arrays (4 bytes per character of the longest
# ID): 256 covers UUIDs, URLs and paths of typical analytics exports.
DEFAULT_MAX_ID_LENGTH = 256
# A line is at most this long (bytes, without its line break): 1 MiB is thousands of
# times any rating line, and keeps memory bounded on a file without newlines.
DEFAULT_MAX_LINE_BYTES = 1 << 20
# |value| above this is a bad line (out_of_range): no star rating, play count or
# seconds on a page comes near it, while one value of 1e20 collapses a model.
DEFAULT_MAX_ABS_VALUE = 1e9
# --exchange auto routes a side whose float32 factor matrix is above this: with one
# copy per SDK process, 1 GiB leaves room for its deserialization, the block cache
# and the solves on a 4 GB-per-process worker (README "Scale model").
DEFAULT_MAX_BROADCAST_MB = 1024
EXCHANGES = ('auto', 'broadcast', 'routed')
VOCABULARIES = ('local', 'distributed')


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case) as a bool; argparse's type= for flags."""
    value = str(text).strip().lower()
    if value in ('1', 'true', 'yes', 'y', 'on'):
        return True
    if value in ('0', 'false', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


def add_input_options(group) -> None:
    """The options that say how to read and split the ratings, shared by the trainer
    and the tuner (python -m pipeline.tune): --data_type, --delimiter, --headers,
    --max_bad_fraction, --max_id_length, --max_line_bytes, --max_abs_value,
    --test_fraction, --split_seed."""
    group.add_argument('--data_type', '--data-type', dest='data_type', default='ratings',
                       choices=DATA_TYPES,
                       help='ratings: lines of user, item, rating[, ignored columns]. '
                            'web_views: CSV with a header naming clientId, contentId, '
                            'timeOnPage; time on page is summed per (user, item). '
                            'Default: ratings.')
    group.add_argument('--delimiter', default=None,
                       help='Field delimiter, one character; "\\t" or "tab" for a tab. '
                            'Default: tab for ratings, comma for web_views.')
    group.add_argument('--headers', action='store_true',
                       help='Skip the first non-blank line of every input file (a header).')
    group.add_argument('--max_bad_fraction', '--max-bad-fraction', dest='max_bad_fraction',
                       type=float, default=0.001,
                       help='Fail (and publish nothing) when more than this share of '
                            'the non-blank lines are bad; bad lines are listed in '
                            'OUTPUT/errors/. Default: 0.001.')
    group.add_argument('--max_id_length', '--max-id-length', dest='max_id_length', type=int,
                       default=DEFAULT_MAX_ID_LENGTH,
                       help='A user or item ID longer than this many characters makes its '
                            'line bad (reason id_too_long): one garbage ID would otherwise '
                            'widen every ID array. Default: '
                            f'{DEFAULT_MAX_ID_LENGTH}.')
    group.add_argument('--max_line_bytes', '--max-line-bytes', dest='max_line_bytes',
                       type=int, default=DEFAULT_MAX_LINE_BYTES,
                       help='A line longer than this many bytes (without its line break) '
                            'is bad (reason line_too_long) and is streamed past, never '
                            'held in memory: a file without newlines cannot exhaust '
                            f'memory. Default: {DEFAULT_MAX_LINE_BYTES} (1 MiB).')
    group.add_argument('--max_abs_value', '--max-abs-value', dest='max_abs_value',
                       type=float, default=DEFAULT_MAX_ABS_VALUE,
                       help='A rating (or time on page) whose absolute value is above '
                            'this is bad (reason out_of_range), like a value that is not '
                            'a finite number: one absurd value can collapse a model. '
                            f'Default: {DEFAULT_MAX_ABS_VALUE:g}.')
    group.add_argument('--test_fraction', '--test-fraction', dest='test_fraction',
                       type=float, default=0.1,
                       help='Share of ratings held out for test RMSE, chosen by a stable '
                            'hash of (user, item, --split_seed). Default: 0.1.')
    group.add_argument('--split_seed', '--split-seed', dest='split_seed', type=int,
                       default=0, help='Seed of the train/test split. Default: 0.')


class WalsOptions(PipelineOptions):
    """The WALS model and data options (any other Beam option passes through).
    Read them as Beam's examples do: PipelineOptions(argv).view_as(WalsOptions),
    then config_from_options() validates them into a TrainConfig."""

    @classmethod
    def _add_argparse_args(cls, parser):
        data = parser.add_argument_group('data')
        data.add_argument('--input', '--train-files', '--train_files', dest='input',
                          help='Ratings file(s): a path or glob, local or gs://; .gz and '
                               'other compressed files are read by their suffix.')
        data.add_argument('--output', '--job-dir', '--job_dir', dest='output',
                          help='Folder (local or gs://) for model/, metrics.json, errors/ '
                               'and _SUCCESS. Default: a new ./output/run-<timestamp> '
                               'folder.')
        add_input_options(data)
        data.add_argument('--overwrite', action='store_true',
                          help='Replace a model already published at --output (otherwise '
                               'the run refuses to start).')
        data.add_argument('--vocabulary', default='local', choices=VOCABULARIES,
                          help='How IDs are numbered: local (every distinct ID of a side '
                               'in one set on one worker) or distributed (by ranges of the '
                               'sorted order, so no worker holds every ID until the model '
                               'files are written; slower on one machine). The model files '
                               'are identical. Default: local.')
        model = parser.add_argument_group('model (names and defaults of the original trainer)')
        model.add_argument('--latent_factors', '--latent-factors', dest='latent_factors',
                           type=int, default=None,
                           help='Number of latent factors k. Default: 5 (wals), 32 (implicit), '
                                '10 (explicit).')
        model.add_argument('--num_iters', '--num-iters', dest='num_iters', type=int,
                           default=None,
                           help='Iterations; one is a row solve then a column solve. '
                                'Default: 20 (wals), 15 (implicit, explicit).')
        model.add_argument('--regularization', type=float, default=None,
                           help='L2 regularization λ; explicit (and implicit, see '
                                '--scale_regularization) scale it by each row\'s rating '
                                'count (λ·n_i). Default: 0.07 (wals), 0.1 (implicit, '
                                'explicit).')
        model.add_argument('--unobs_weight', '--unobs-weight', dest='unobs_weight',
                           type=float, default=None,
                           help='Weight w0 of every unobserved entry. Default: 0.01.')
        model.add_argument('--weights', type=parse_bool, default=None,
                           help='true: observed entries weigh w0 + C_j from item '
                                'popularity; false: every entry weighs w0 (plain ALS). '
                                'Default: true.')
        model.add_argument('--wt_type', '--wt-type', dest='wt_type', type=parse_wt_type,
                           default=None,
                           help='Column weight type: linear (C_j = feature_wt_factor / n_j) '
                                'or log (C_j = (1/n_j) ** feature_wt_exp); the original\'s '
                                'codes 0 = log and 1 = linear are accepted (its help text '
                                'had them backwards). Default: linear for ratings, log for '
                                'web_views.')
        model.add_argument('--feature_wt_factor', '--feature-wt-factor',
                           dest='feature_wt_factor', type=float, default=None,
                           help='Linear weight factor. Default: 130.0.')
        model.add_argument('--feature_wt_exp', '--feature-wt-exp', dest='feature_wt_exp',
                           type=float, default=None,
                           help='Log weight exponent. Default: 0.08.')
        model.add_argument('--use_optimized', '--use-optimized', dest='use_optimized',
                           action='store_true',
                           help='Start from the original\'s tuned set for the data type '
                                '(ratings: latent_factors 34, regularization 9.83, '
                                'unobs_weight 0.001, feature_wt_factor 189.8; web_views: '
                                'latent_factors 30, regularization 7.27, unobs_weight 0.01, '
                                'feature_wt_exp 5.05); options given explicitly still win.')
        objective = parser.add_argument_group(
            'objective (--model) and its parameters',
            'wals: the original TF WALS objective (defaults above). implicit: implicit '
            'feedback (play counts, clicks, views): Hu-Koren-Volinsky confidence '
            'weighting, every unobserved pair weighs 1 with preference 0; defaults '
            'latent_factors 32, num_iters 15, regularization 0.1 scaled by each row\'s rating '
            'count (--scale_regularization). '
            'explicit: ratings (stars), observed entries only, with a global mean and '
            'per-user and per-item biases, regularization scaled by each row\'s rating '
            'count (ALS-WR); defaults latent_factors 10, num_iters 15, regularization '
            '0.1. Options given explicitly win over a mode\'s defaults.')
        objective.add_argument('--model', default='wals', choices=MODELS,
                               help='The objective. Default: wals.')
        objective.add_argument('--alpha', type=float, default=None,
                               help='implicit: confidence 1 + alpha * g(r) of an observed '
                                    'pair. Default: 1.0.')
        objective.add_argument('--epsilon', type=float, default=None,
                               help='implicit, log confidence: g(r) = log1p(r / epsilon). '
                                    'Default: 1.0.')
        objective.add_argument('--scale_regularization', '--scale-regularization',
                               dest='scale_regularization', type=parse_bool, default=None,
                               help='implicit: true multiplies λ by each user\'s (item\'s) '
                                    'rating count, as Spark\'s implicitPrefs does (the same λ '
                                    'then suits small and large data); false: one λ for every '
                                    'row, as the implicit library. Default: true.')
        objective.add_argument('--confidence', default=None, choices=('log', 'linear'),
                               help='implicit: g(r) = log1p(r / epsilon) (log, robust to '
                                    'heavy-tailed counts) or g(r) = r (linear). Default: log.')

        evaluation = parser.add_argument_group('evaluation')
        evaluation.add_argument('--test_input', '--test-input', dest='test_input',
                                default=None,
                                help='Held-out ratings file(s) (same formats and bad-line '
                                     'rules as --input) to evaluate on instead of the hashed '
                                     'split; all of --input then trains. Pairs whose user or '
                                     'item is not in --input count as cold start.')
        evaluation.add_argument('--rank_k', '--rank-k', dest='rank_k', type=int, default=10,
                                help='K of precision/recall/MAP/NDCG@K on the test pairs '
                                     '(0: no ranking metrics). Default: 10.')
        evaluation.add_argument('--relevance_threshold', '--relevance-threshold',
                                dest='relevance_threshold', type=float, default=None,
                                help='A test pair is relevant for the ranking metrics when '
                                     'its rating is at least this. Default: 0 (every test '
                                     'pair) for --model implicit and web_views, else the '
                                     'mean training rating (on 1-5 stars: 4 and 5 are '
                                     'relevant).')
        rerun = parser.add_argument_group(
            're-runs on new dumps (see README "Re-running on new dumps")')
        rerun.add_argument('--model_root', '--model-root', dest='model_root', default=None,
                           help='Versioned model root (local or gs://): the run publishes '
                                'to ROOT/versions/<version>/ and, when the gate passes, '
                                'points ROOT/LATEST at it. Instead of --output.')
        rerun.add_argument('--previous_model', '--previous-model', dest='previous_model',
                           default=None,
                           help='A model folder, or a model root (its LATEST), to warm '
                                'start from by ID and to compare with on the same test '
                                'pairs. Default with --model_root: ROOT/LATEST, if any.')
        rerun.add_argument('--no_warm_start', '--no-warm-start', dest='no_warm_start',
                           action='store_true',
                           help='With --model_root: do not warm start from LATEST (still '
                                'compare with it for the gate).')
        rerun.add_argument('--max_regression', '--max-regression', dest='max_regression',
                           type=float, default=None,
                           help='Promotion gate: when the new model is worse than the '
                                'previous one by more than this (relative, e.g. 0.02 = 2%%) '
                                'on the same test pairs, publish the version but leave '
                                'LATEST, and exit with code 3. Default: no gate.')
        rerun.add_argument('--gate_metric', '--gate-metric', dest='gate_metric',
                           default=None, choices=('rmse', 'ndcg'),
                           help='The gate\'s metric: test RMSE, or NDCG@rank_k. Default: '
                                'rmse, ndcg for --model implicit.')
        rerun.add_argument('--keep_versions', '--keep-versions', dest='keep_versions',
                           type=int, default=None,
                           help='After a promotion, delete the oldest versions beyond the '
                                'newest N (never the one LATEST names). Default: keep all.')
        rerun.add_argument('--tolerance', type=float, default=0.0,
                           help='Stop early once the relative change of the training '
                                'objective between iterations falls below this; the rest '
                                'of the (unrolled) iterations pass the factors through. '
                                'Default: 0 (run every iteration).')
        rerun.add_argument('--eval_every', '--eval-every', dest='eval_every', type=int,
                           default=0,
                           help='Also record the test metrics every N iterations in the '
                                'convergence history. Default: 0 (only at the end).')
        model.add_argument('--seed', type=int, default=0,
                           help='Seed of the initial factors (each ID gets the same '
                                'vector on any runner). Default: 0.')
        model.add_argument('--block_size', '--block-size', dest='block_size', type=int,
                           default=DEFAULT_BLOCK_SIZE,
                           help='Users (or items) per block: the unit of parallel work and '
                                'of memory per solve; lower it to spread a half-step over '
                                f'more workers. Default: {DEFAULT_BLOCK_SIZE}.')
        model.add_argument('--exchange', default=None, choices=EXCHANGES,
                           help='How a half-step gets the other side\'s factors: '
                                'broadcast (the whole matrix to every worker, a side '
                                'input), routed (each block receives only the rows its '
                                'ratings refer to, by a shuffle, as Spark ALS does), or '
                                'auto (per side at run time: routed above '
                                '--max_broadcast_mb). Results are bit-identical. '
                                'Default: auto on Dataflow, broadcast elsewhere (routing '
                                'costs a shuffle per half-step).')
        model.add_argument('--solver', default='exact', choices=SOLVERS,
                           help='How each row\'s k x k system is solved: exact (a batched '
                                'Cholesky/LU in float64, as the original; TF parity) or cg '
                                '(--cg_steps conjugate-gradient steps per row, warm-started '
                                'from the row\'s factors of the previous iteration, as the '
                                'implicit library: approximate, faster from k of about 16; '
                                'docs/math.md "Solvers"). Default: exact.')
        model.add_argument('--cg_steps', '--cg-steps', dest='cg_steps', type=int, default=3,
                           help='--solver cg: conjugate-gradient steps per row and '
                                'half-step. Default: 3.')
        model.add_argument('--max_broadcast_mb', '--max-broadcast-mb',
                           dest='max_broadcast_mb', type=float,
                           default=DEFAULT_MAX_BROADCAST_MB,
                           help='--exchange auto: the largest factor matrix (rows x '
                                'columns x 4 bytes, in MiB) still broadcast. Default: '
                                f'{DEFAULT_MAX_BROADCAST_MB} (for 4 GB per worker process).')


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
    eval_every: int = 0
    exchange: str = 'broadcast'
    max_broadcast_mb: float = DEFAULT_MAX_BROADCAST_MB

    def describe(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(out.pop('params'))
        return out


# Each mode's defaults, applied over the original's (see the --model help text and
# the README's "Which --model" section for how they were chosen).
# The original trainer's defaults (task.py); wt_type depends on --data_type.
WALS_DEFAULTS = dict(latent_factors=5, num_iters=20, regularization=0.07, unobs_weight=0.01,
                     weights=True, feature_wt_factor=130.0, feature_wt_exp=0.08)
MODE_DEFAULTS = {
    'wals': {},
    # λ·n_i, as Spark's implicitPrefs: a plain λ means something else at every data
    # size (best 20 on MovieLens 100k, past 100 on the 1m synthetic set), while
    # λ 0.1 scaled by each row's count is the best of the grids on both (README).
    'implicit': dict(latent_factors=32, num_iters=15, regularization=0.1, alpha=1.0,
                     epsilon=1.0, confidence='log', scale_regularization=True),
    'explicit': dict(latent_factors=10, num_iters=15, regularization=0.1),
}


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
    base = dict(WALS_DEFAULTS, wt_type=default_wt_type(args.data_type))
    if args.use_optimized:
        if args.model != 'wals':
            raise ConfigError('--use_optimized holds the original WALS tuning: it needs '
                              '--model wals')
        base.update(OPTIMIZED[args.data_type])
    base.update(MODE_DEFAULTS[args.model])
    wals_only = ('unobs_weight', 'weights', 'wt_type', 'feature_wt_factor', 'feature_wt_exp')
    implicit_only = ('alpha', 'epsilon', 'confidence', 'scale_regularization')
    for name in (*base, *wals_only, *implicit_only):
        if getattr(args, name, None) is not None:
            if name in wals_only and args.model != 'wals':
                raise ConfigError(f'--{name} is a parameter of --model wals, not of '
                                  f'--model {args.model}')
            if name in implicit_only and args.model != 'implicit':
                raise ConfigError(f'--{name} is a parameter of --model implicit')
            base[name] = getattr(args, name)
    if args.cg_steps < 1:
        raise ConfigError('--cg_steps must be at least 1')
    params = WalsParams(model=args.model, solver=args.solver, cg_steps=args.cg_steps, **base)
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
    gate_metric = args.gate_metric or ('ndcg' if args.model == 'implicit' else 'rmse')
    if gate_metric == 'rmse' and args.model == 'implicit' and args.max_regression is not None:
        raise ConfigError('--gate_metric rmse does not apply to --model implicit (no RMSE): '
                          'use --gate_metric ndcg')
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
                       tolerance=args.tolerance, eval_every=args.eval_every,
                       exchange=exchange, max_broadcast_mb=args.max_broadcast_mb)

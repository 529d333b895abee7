"""Command-line options of the trainer, and their validation into a TrainConfig.

Names and defaults follow the original TF trainer's task.py; its dashed
spellings (--data-type, --use-optimized, --train-files, --job-dir) work too.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os

from apache_beam.options.pipeline_options import PipelineOptions

from wals_core.params import (DATA_TYPES, MODELS, OPTIMIZED, WalsParams,
                              default_wt_type, parse_wt_type)

# Big enough that a block's solve keeps both cores busy and a half-step pays little
# per-block overhead (10M ratings, k=10, 2 cores, back to back: 2048 -> 0.97 s per
# iteration, 8192 -> 0.80 s, 65536 -> 0.68 s); lower it for more parallel tasks on
# many workers.
DEFAULT_BLOCK_SIZE = 16384


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case) as a bool; argparse's type= for flags."""
    value = str(text).strip().lower()
    if value in ('1', 'true', 'yes', 'y', 'on'):
        return True
    if value in ('0', 'false', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


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
        data.add_argument('--data_type', '--data-type', dest='data_type', default='ratings',
                          choices=DATA_TYPES,
                          help='ratings: lines of user, item, rating[, ignored columns]. '
                               'web_views: CSV with a header naming clientId, contentId, '
                               'timeOnPage; time on page is summed per (user, item). '
                               'Default: ratings.')
        data.add_argument('--delimiter', default=None,
                          help='Field delimiter, one character; "\\t" or "tab" for a tab. '
                               'Default: tab for ratings, comma for web_views.')
        data.add_argument('--headers', action='store_true',
                          help='Skip the first line of every input file (a header).')
        data.add_argument('--max_bad_fraction', '--max-bad-fraction', dest='max_bad_fraction',
                          type=float, default=0.001,
                          help='Fail (and publish nothing) when more than this share of '
                               'the non-blank lines are bad; bad lines are listed in '
                               'OUTPUT/errors/. Default: 0.001.')
        data.add_argument('--overwrite', action='store_true',
                          help='Replace a model already published at --output (otherwise '
                               'the run refuses to start).')
        data.add_argument('--test_fraction', '--test-fraction', dest='test_fraction',
                          type=float, default=0.1,
                          help='Share of ratings held out for test RMSE, chosen by a stable '
                               'hash of (user, item, --split_seed). Default: 0.1.')
        data.add_argument('--split_seed', '--split-seed', dest='split_seed', type=int,
                          default=0, help='Seed of the train/test split. Default: 0.')

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
                           help='L2 regularization λ; explicit scales it by each row\'s '
                                'rating count (λ·n_i). Default: 0.07 (wals), 1.0 '
                                '(implicit), 0.1 (explicit).')
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
            'latent_factors 32, num_iters 15, regularization 1.0 (not scaled by counts). '
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
        model.add_argument('--seed', type=int, default=0,
                           help='Seed of the initial factors (each ID gets the same '
                                'vector on any runner). Default: 0.')
        model.add_argument('--block_size', '--block-size', dest='block_size', type=int,
                           default=DEFAULT_BLOCK_SIZE,
                           help='Users (or items) per block: the unit of parallel work and '
                                'of memory per solve; lower it to spread a half-step over '
                                f'more workers. Default: {DEFAULT_BLOCK_SIZE}.')


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
    test_input: str | None = None
    rank_k: int = 10
    relevance_threshold: float | None = None   # None: by the data (EvalConfig.threshold)

    def describe(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(out.pop('params'))
        return out


# Each mode's defaults, applied over the original's (see the --model help text and
# the README's "Which --model" section for how they were chosen).
MODE_DEFAULTS = {
    'wals': {},
    'implicit': dict(latent_factors=32, num_iters=15, regularization=1.0, alpha=1.0,
                     epsilon=1.0, confidence='log'),
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


def default_output() -> str:
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')
    return os.path.join('output', f'run-{stamp}')


def config_from_options(options: PipelineOptions) -> TrainConfig:
    """Validated TrainConfig from the WalsOptions view of `options`."""
    args = options.view_as(WalsOptions)
    if not args.input:
        raise ConfigError('--input is required (a ratings file or glob)')
    base = dict(latent_factors=5, num_iters=20, regularization=0.07, unobs_weight=0.01,
                weights=True, wt_type=default_wt_type(args.data_type),
                feature_wt_factor=130.0, feature_wt_exp=0.08)
    if args.use_optimized:
        if args.model != 'wals':
            raise ConfigError('--use_optimized holds the original WALS tuning: it needs '
                              '--model wals')
        base.update(OPTIMIZED[args.data_type])
    base.update(MODE_DEFAULTS[args.model])
    wals_only = ('unobs_weight', 'weights', 'wt_type', 'feature_wt_factor', 'feature_wt_exp')
    for name in (*base, *wals_only, 'alpha', 'epsilon', 'confidence'):
        if getattr(args, name, None) is not None:
            if name in wals_only and args.model != 'wals':
                raise ConfigError(f'--{name} is a parameter of --model wals, not of '
                                  f'--model {args.model}')
            if name in ('alpha', 'epsilon', 'confidence') and args.model != 'implicit':
                raise ConfigError(f'--{name} is a parameter of --model implicit')
            base[name] = getattr(args, name)
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
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    output = args.output or default_output()
    if output.rstrip('/') == args.input.rstrip('/'):
        raise ConfigError('--output must not be the input path')
    if args.test_input and output.rstrip('/') == args.test_input.rstrip('/'):
        raise ConfigError('--output must not be the --test_input path')
    return TrainConfig(input=args.input, output=output, data_type=args.data_type,
                       delimiter=parse_delimiter(args.delimiter, args.data_type),
                       headers=args.headers, params=params,
                       test_fraction=args.test_fraction, split_seed=args.split_seed,
                       seed=args.seed, block_size=args.block_size,
                       max_bad_fraction=args.max_bad_fraction,
                       test_input=args.test_input or None, rank_k=args.rank_k,
                       relevance_threshold=args.relevance_threshold)

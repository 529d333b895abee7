"""python -m pipeline.tune (wals tune): hyperparameter search for the trainer.

Searches latent_factors, regularization and the mode's weight parameters with
Optuna (TPE, seeded) on a validation split carved out of the training pairs
(the trainer's test split is never used), trials running in parallel as the
elements of a Beam pipeline. Writes DIR/trials.csv, DIR/best.json (with the
`python -m pipeline.train` command that trains the best parameters on the full
data) and logs each trial.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.cli.common import prog, run_command, setup_logging, split_beam_args
from pipeline.option_table import TRAIN, add_input_options
from pipeline.options import ConfigError
from pipeline.strict_json import dumps
from pipeline.tuning.search import config_from_args, run
from wals_core.defaults import PARAMETER

EPILOG = """The data must fit one worker: every trial trains wals_core's in-memory
trainer on the whole (sampled) training split. For bigger inputs pass
--sample_users N (a stable hash chooses the users, before the ratings are gathered).
Any other option is a Beam pipeline option and passes through, e.g.
  --runner DataflowRunner --project P --region R --temp_location gs://B/tmp
  --direct_running_mode multi_processing --direct_num_workers 2
Without Beam options it runs on the DirectRunner, --parallel trials at a time over
the machine's cores (multi_threading: trials spend their time in numpy, which
releases the GIL; in_memory when --parallel is 1)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog('tune'),
                                description=__doc__.split('\n\n')[1], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group('data (as python -m pipeline.train)')
    data.add_argument('--input', required=True,
                      help='Ratings file(s): a path or glob, local or gs://.')
    data.add_argument('--output', required=True,
                      help='Folder (local or gs://) for trials.csv and best.json.')
    add_input_options(data)     # the trainer's: read and split the same way
    PARAMETER['seed'].add_to(data)
    data.add_argument('--validation_fraction', type=float, default=0.1,
                      help='Share of the training pairs (by a stable hash) used to score '
                           'trials. Default: 0.1.')
    data.add_argument('--sample_users', type=int, default=None,
                      help='Tune on N users only, chosen by a stable hash of their ID.')
    data.add_argument('--overwrite', action='store_true',
                      help='Replace the results of an earlier search in --output.')

    search = p.add_argument_group('search')
    # The trainer's options (wals_core/defaults.py, pipeline/option_table.py), with the
    # tuner's help where a search gives them another meaning.
    PARAMETER['model'].add_to(search, help='The objective (python -m pipeline.train '
                              '--help tells them apart). Default: wals.')
    search.add_argument('--metric', choices=('rmse', 'ndcg'), default=None,
                        help='rmse (lower is better; not for --model implicit) or ndcg '
                             '(NDCG@10 on the validation pairs). Default: rmse, ndcg for '
                             'implicit.')
    search.add_argument('--trials', type=int, default=20, help='Trials in all. Default: 20.')
    search.add_argument('--parallel', type=int, default=None,
                        help='Trials per batch (one Beam pipeline each). Default: 2 x cores.')
    search.add_argument('--search_seed', type=int, default=0, help='Seed of the TPE sampler.')
    num_iters, wt_type = PARAMETER['num_iters'], PARAMETER['wt_type']
    num_iters.add_to(search, help='Iterations per trial. Default: the mode\'s '
                     f'({num_iters.default_description()}).')
    wt_type.add_to(search, help='wals: linear (searches feature_wt_factor) or log '
                   f'(feature_wt_exp). Default: {wt_type.default_description()}.')
    PARAMETER['confidence'].add_to(
        search, help='implicit: confidence 1 + alpha*log1p(r/epsilon) or 1 + alpha*r '
                     '(epsilon is then not searched). Default: log.')
    TRAIN['relevance_threshold'].add_to(
        search, help='ndcg: validation ratings >= this are relevant. Default: 0 for '
                     'implicit / web_views, else the mean training rating.')
    PARAMETER['solver'].add_to(
        search, default='exact', help='Every trial\'s solver, as the trainer\'s --solver '
                                      '(fixed, not searched). Default: exact.')
    PARAMETER['cg_steps'].add_to(
        search, default=3, help='--solver cg: conjugate-gradient steps per row. Default: 3.')
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # multi_processing workers forward their log here; their warnings are about
    # options they do not know (the trainer's, registered by import), not about trials.
    setup_logging(quiet=('apache_beam.runners.portability.local_job_service',))
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    try:
        config = config_from_args(args)
        beam_args = split_beam_args(beam_args)
    except ConfigError as e:
        parser.error(str(e))
    return run_command(lambda: _tune(config, beam_args), parser)


def _tune(config, beam_args: list[str]) -> int:
    summary = run(config, beam_args)
    print(dumps({k: summary[k] for k in ('model', 'metric', 'value', 'trial', 'params')},
                indent=2))
    print(f'Train with: {summary["command"]}')
    print(f'Trials: {config.output}/trials.csv')
    return 0


if __name__ == '__main__':
    sys.exit(main())

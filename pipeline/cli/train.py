"""python -m pipeline.train (wals train): train a WALS model with Apache Beam.

Reads a delimited ratings dump, splits it into train/test by a stable hash,
factorizes it with weighted alternating least squares and writes
OUTPUT/model/{user,item,row,col}.npy, OUTPUT/metrics.json and OUTPUT/_SUCCESS.
Runs on any Beam runner (DirectRunner by default, Dataflow with --runner).

This is the command line only: the run (staging, publishing, the gate) is
pipeline/training/run.py and the Beam graph pipeline/training/graph.py. Not to be
confused with wals_core/train.py, the in-memory numpy trainer (no Beam) that the
tests compare the pipeline with.
"""
from __future__ import annotations

import argparse
import sys

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli.common import prog, run_command, setup_logging, split_beam_args
from pipeline.errors import EXIT_GATE
from pipeline.options import ConfigError, WalsOptions, config_from_options
from pipeline.runners.memory_tuning import tune_malloc
from pipeline.store.report import PLOT, summary_lines
from pipeline.store.shared_storage import SharedStorageOptions  # noqa: F401 - its flags
from pipeline.strict_json import dumps
from pipeline.training.run import COUNT_KEYS, OutputExists, run

EPILOG = """Any other option is a Beam pipeline option and is passed through, e.g.
  --runner DataflowRunner --project P --region R --temp_location gs://B/tmp
  --direct_running_mode multi_processing --direct_num_workers 2
Outputs: OUTPUT/model/user.npy and item.npy (entry i is the ID of row/column i),
OUTPUT/model/row.npy (users x latent_factors, float32), OUTPUT/model/col.npy
(items x latent_factors, float32), OUTPUT/metrics.json, OUTPUT/errors/ (bad
lines) and, written last, OUTPUT/_SUCCESS (a manifest with checksums). The run
works in OUTPUT.tmp-<run id> and publishes only when it has succeeded."""


def build_parser() -> argparse.ArgumentParser:
    """The command line's --help and value checks (WalsOptions' flags); the values
    themselves are read with PipelineOptions(argv).view_as(WalsOptions)."""
    parser = argparse.ArgumentParser(
        prog=prog('train'), description=__doc__.split('\n\n')[1],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)   # as Beam parses: --num_iter is a typo, not --num_iters
    WalsOptions._add_argparse_args(parser)   # Beam's hook for a PipelineOptions class
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The unrolled graph is deep (about 10 stages per iteration) and Beam's
    # runners walk it recursively: leave room for thousands of iterations.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 100_000))
    tune_malloc()
    setup_logging()
    parser = build_parser()
    _, rest = parser.parse_known_args(argv)    # --help, and bad values exit here
    options = PipelineOptions(argv)
    try:
        split_beam_args(rest)
        config = config_from_options(options)
    except ConfigError as e:
        parser.error(str(e))
    return run_command(lambda: _train(config, options), parser, refused=(OutputExists,),
                       after_failure=f'\nNothing was published to {config.output}.')


def _train(config, options: PipelineOptions) -> int:
    metrics = run(config, options, overwrite=options.view_as(WalsOptions).overwrite)
    print(dumps({k: metrics[k] for k in ('train_rmse', 'test_rmse', *COUNT_KEYS)},
                indent=2))
    print(f'Lines: {dumps(metrics["lines"])}')
    outcome, report = metrics['outcome'], metrics['report']
    out = outcome['published']
    if out:
        out = out.rstrip('/')
        print(f'Model written to {out}/model/ (metrics: {out}/metrics.json, report: '
              f'{out}/report.json, plot: {out}/{PLOT})')
    print('\n'.join(summary_lines(report, outcome['message'])))
    if not report['gate']['passed']:
        print(f'error: the gate refused the new model: {report["gate"]["reason"]}. '
              f'{outcome["message"]}', file=sys.stderr)
        return EXIT_GATE
    return 0


if __name__ == '__main__':
    sys.exit(main())

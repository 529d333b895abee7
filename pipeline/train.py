"""python -m pipeline.train: train a WALS model with Apache Beam.

Reads a delimited ratings dump, splits it into train/test by a stable hash,
factorizes it with weighted alternating least squares and writes
OUTPUT/model/{user,item,row,col}.npy, OUTPUT/metrics.json and OUTPUT/_SUCCESS.
Runs on any Beam runner (DirectRunner by default, Dataflow with --runner).

This is the launcher (command line, staging, publishing); the Beam graph is
pipeline/train_graph.py. Not to be confused with wals_core/train.py, the
in-memory numpy trainer (no Beam) that the tests compare the pipeline with.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TypeOptions

from pipeline.errors import QuietMarkedErrors, user_message
from pipeline.memory_tuning import tune_malloc
from pipeline.train_graph import build_pipeline
from pipeline.write_model import save_json
from pipeline.options import ConfigError, TrainConfig, WalsOptions, config_from_options
from pipeline.publish import (OutputExists, check_output, describe_inputs, discard,
                              new_run_id, publish, remove_tree, staging_path)

log = logging.getLogger('pipeline.train')

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
        prog='python -m pipeline.train', description=__doc__.split('\n\n')[1],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)   # as Beam parses: --num_iter is a typo, not --num_iters
    WalsOptions._add_argparse_args(parser)   # Beam's hook for a PipelineOptions class
    return parser


def unknown_options(argv: list[str]) -> list[str]:
    """The --flags in argv that no PipelineOptions class (Beam's or WalsOptions)
    defines: Beam keeps those only when asked to retain unknown options."""
    known = PipelineOptions([]).get_all_options()
    retained = PipelineOptions(argv).get_all_options(retain_unknown_options=True)
    unknown = set(retained) - set(known)
    return [a for a in argv if a.startswith('--')
            and a[2:].split('=', 1)[0].replace('-', '_') in unknown]


def split_beam_args(rest: list[str]) -> list[str]:
    """Checks that leftover arguments are Beam options; raises on a typo."""
    unknown = unknown_options(rest)
    if unknown:
        raise ConfigError(f'unknown option(s): {" ".join(unknown)} (see --help)')
    return rest


def check_inputs(pattern: str) -> list[dict]:
    """The input files, or a ConfigError before any work starts."""
    try:
        inputs = describe_inputs(pattern)
    except Exception as e:   # noqa: BLE001 - the filesystem's own error says why
        raise ConfigError(f'cannot list --input {pattern}: {e}') from None
    if not inputs:
        raise ConfigError(f'no file matches --input {pattern}')
    for item in inputs:
        try:
            FileSystems.open(item['path']).close()
        except Exception as e:   # noqa: BLE001
            raise ConfigError(f'cannot read {item["path"]}: {e}') from None
    return inputs


def run(config: TrainConfig, options: PipelineOptions, overwrite: bool = False) -> dict:
    """Builds and runs the pipeline into a staging folder, then publishes the model
    to config.output with its _SUCCESS manifest. Returns the metrics."""
    started = time.time()
    inputs = check_inputs(config.input)
    check_output(config.output, overwrite)
    run_id = new_run_id()
    staging = staging_path(config.output, run_id)
    standard = options.view_as(StandardOptions)
    standard.runner = standard.runner or 'DirectRunner'
    # The graph declares no type hints; checking them costs seconds per build.
    options.view_as(TypeOptions).pipeline_type_check = False
    pipeline = beam.Pipeline(options=options)
    work_dir = build_pipeline(pipeline, config, staging)
    built = time.time()
    log.info('Training %d iterations of WALS on %s (%d file(s)); staging in %s',
             config.params.num_iters, config.input, len(inputs), staging)
    try:
        pipeline.run().wait_until_finish()
    except BaseException:
        discard(staging)
        raise
    finished = time.time()
    path = f'{staging}/metrics.json'
    with FileSystems.open(path) as f:
        metrics = json.loads(f.read())
    metrics['phase_seconds'].update(
        build_graph=round(built - started, 3),
        pipeline=round(finished - built, 3),
        total=round(finished - started, 3))
    save_json(path, metrics)
    remove_tree(work_dir)      # the saved rating blocks: not part of a model
    counts = {k: metrics[k] for k in COUNT_KEYS}
    publish(staging, config.output, {'run_id': run_id, 'inputs': inputs,
                                     'parameters': config.describe(), 'counts': counts,
                                     'lines': metrics['lines']})
    log.info('Published the model to %s', config.output)
    return metrics


COUNT_KEYS = ('users', 'items', 'train_ratings', 'test_ratings', 'test_cold_start_ratings',
              'duplicates_merged')


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The unrolled graph is deep (about 10 stages per iteration) and Beam's
    # runners walk it recursively: leave room for thousands of iterations.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 100_000))
    tune_malloc()
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    logging.getLogger('apache_beam').setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietMarkedErrors())
    parser = build_parser()
    _, rest = parser.parse_known_args(argv)    # --help, and bad values exit here
    options = PipelineOptions(argv)
    try:
        split_beam_args(rest)
        config = config_from_options(options)
    except ConfigError as e:
        parser.error(str(e))
    try:
        metrics = run(config, options, overwrite=options.view_as(WalsOptions).overwrite)
    except (ConfigError, OutputExists) as e:
        parser.error(str(e))
    except Exception as e:   # noqa: BLE001 - turn runner-wrapped errors into a message
        message = user_message(e)
        if message is None:
            raise
        print(f'error: {message}\nNothing was published to {config.output}.', file=sys.stderr)
        return 1
    print(json.dumps({k: metrics[k] for k in ('train_rmse', 'test_rmse', *COUNT_KEYS)},
                     indent=2))
    print(f'Lines: {json.dumps(metrics["lines"])}')
    out = config.output.rstrip('/')
    print(f'Model written to {out}/model/ (metrics: {out}/metrics.json)')
    return 0


if __name__ == '__main__':
    sys.exit(main())

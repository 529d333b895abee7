"""python -m pipeline.dataflow (run_dataflow.sh): the trainer on Google Cloud Dataflow.

`run_dataflow.sh recommend ...` launches the batch recommendations
(pipeline.cli.recommend.launch_dataflow) with the same cloud defaults instead;
`run_dataflow.sh train ...` is the trainer, as is a command line without a module.

The same command line as pipeline.cli.train / run_local.sh (it reuses that parser and
its validation), plus --project, --region and --bucket gs://B, from which it fills
in everything else a Dataflow job needs:

  job name        wals-<UTC timestamp>                (--job_name)
  input           gs://B/ratings/*                    (--input)
  output          gs://B/models/<job name>            (--output)
  temp, staging   gs://B/tmp, gs://B/staging          (--temp_location, --staging_location)
  worker package  this checkout's setup.py            (--setup_file)
  workers         n1-highmem-4, up to 1 per 256 MiB of input (1..20)
                                                      (--machine_type, --max_num_workers)

Every other option is a Beam/Dataflow pipeline option and passes through.
Before submitting it measures the job graph (which grows with --num_iters) against
Dataflow's 10 MB limit: it adds --experiments=upload_graph when that is needed, and
refuses when even an uploaded graph would be too large.

A normal run then hands over to pipeline.cli.train: the launcher waits for the job, then
publishes the model (the _SUCCESS manifest is written by this process, after the job
succeeds), so keep it running; Ctrl-C stops the waiting, not the job.
--dry_run builds the whole job locally and submits nothing, touching no Cloud
resource; --template_location=FILE (a Beam option) stages the job and writes its
full description to FILE without running it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys

from apache_beam.options.pipeline_options import (DebugOptions, GoogleCloudOptions,
                                                  PipelineOptions)
from google.protobuf import json_format

from pipeline.cli import train
from pipeline.cli.common import setup_logging, split_beam_args
from pipeline.training.graph import build_pipeline
from pipeline.training.run import check_inputs
from pipeline.options import (ConfigError, TrainConfig, WalsOptions, config_from_options,
                              parse_bool)
from pipeline.store.publish import new_run_id, staging_path
from pipeline.strict_json import dumps
from pipeline.runners.cloud_launch import (DEFAULT_MACHINE_TYPE, MAX_WORKERS_CAP,  # noqa: F401
                                   MAX_WORKERS_UNKNOWN_INPUT, CloudOptions,
                                   add_cloud_arguments, cloud_options, default_max_workers)
from pipeline.runners.factory import make_pipeline

log = logging.getLogger(__name__)

# Dataflow refuses a job whose graph is larger than this (its documented limit).
GRAPH_LIMIT_BYTES = 10 * 1024 * 1024
# With --experiments=upload_graph the graph goes through Cloud Storage instead of
# the request; the Beam and Dataflow teams give about 100 MB as the ceiling then.
UPLOADED_GRAPH_LIMIT_BYTES = 100 * 1024 * 1024
UPLOAD_GRAPH = 'upload_graph'

EPILOG = """Defaults (each can be overridden by giving the option):
  --job_name wals-<UTC timestamp>   --input gs://B/ratings/*
  --output gs://B/models/<job name>  --temp_location gs://B/tmp
  --staging_location gs://B/staging  --setup_file <this checkout>/setup.py
  --machine_type n1-highmem-4        --max_num_workers <1 per 256 MiB of input, 1..20>
Any other option is a Beam/Dataflow option and is passed through, e.g.
  --flexrs_goal COST_OPTIMIZED --service_account_email SA --network N --subnetwork S
  --template_location FILE (stage the job and write its description, do not run)
Batch recommendations from a model: ./run_dataflow.sh recommend --help
Examples:
  ./run_dataflow.sh --project P --region us-central1 --bucket gs://B --dry_run
  ./run_dataflow.sh --project P --region us-central1 --bucket gs://B \\
      --input 'gs://B/ratings/*.tsv' --num_iters 20 --use_optimized"""


def build_parser() -> argparse.ArgumentParser:
    """pipeline.cli.train's parser (data and model options) plus the Google Cloud ones."""
    parser = train.build_parser()
    parser.prog = './run_dataflow.sh'
    parser.description = ('Train the WALS model on Google Cloud Dataflow, reading from '
                          'and writing to Cloud Storage.')
    parser.epilog = EPILOG
    add_cloud_arguments(parser)
    return parser


@dataclasses.dataclass(frozen=True)
class GraphSize:
    """Job graph bytes as a function of the iteration count: base + n * per_iteration."""
    base_bytes: int
    per_iteration_bytes: int

    def total(self, num_iters: int) -> int:
        return self.base_bytes + num_iters * self.per_iteration_bytes

    def max_iterations(self, limit_bytes: int) -> int:
        if self.per_iteration_bytes <= 0:
            return sys.maxsize
        return max(0, (limit_bytes - self.base_bytes) // self.per_iteration_bytes)


def graph_bytes(config: TrainConfig) -> int:
    """Size of the job graph: the JSON form of the Runner API pipeline that Dataflow
    turns into its job graph (about a third larger than the binary form Beam stages,
    so the limits below are applied on the safe side)."""
    pipeline = make_pipeline(PipelineOptions([]))     # built, never run
    build_pipeline(pipeline, config, staging_path(config.output, 'size'))
    return len(json_format.MessageToJson(pipeline.to_runner_api(), indent=None))


def measure_graph(config: TrainConfig) -> GraphSize:
    """Graph bytes of this configuration, from the graphs of 1 and 2 iterations
    (each iteration adds the same transforms)."""
    return _measure_graph(dataclasses.replace(
        config, params=dataclasses.replace(config.params, num_iters=0)))


@functools.lru_cache(maxsize=8)
def _measure_graph(config: TrainConfig) -> GraphSize:
    one, two = (graph_bytes(dataclasses.replace(
        config, params=dataclasses.replace(config.params, num_iters=n))) for n in (1, 2))
    return GraphSize(base_bytes=2 * one - two, per_iteration_bytes=two - one)


def check_graph(size: GraphSize, num_iters: int, experiments: list[str],
                staging_on_gcs: bool = True) -> list[str]:
    """The experiments to add so that Dataflow accepts the job graph: [] or
    ['upload_graph']. ConfigError when no option can make it fit."""
    total = size.total(num_iters)
    over = (f'--num_iters {num_iters} needs a job graph of about {total / 1e6:.1f} MB '
            f'({size.per_iteration_bytes / 1e3:.1f} kB per iteration)')
    if total > UPLOADED_GRAPH_LIMIT_BYTES:
        fits = size.max_iterations(UPLOADED_GRAPH_LIMIT_BYTES)
        raise ConfigError(
            f'{over}: more than Dataflow accepts even with --experiments={UPLOAD_GRAPH} '
            f'(about {UPLOADED_GRAPH_LIMIT_BYTES >> 20} MB). Use --num_iters {fits} or '
            'fewer.')
    if total <= GRAPH_LIMIT_BYTES or UPLOAD_GRAPH in experiments:
        return []
    if not staging_on_gcs:
        fits = size.max_iterations(GRAPH_LIMIT_BYTES)
        raise ConfigError(
            f'{over}, over Dataflow\'s {GRAPH_LIMIT_BYTES >> 20} MB limit, and '
            f'--experiments={UPLOAD_GRAPH} needs a gs:// --staging_location. Use '
            f'--num_iters {fits} or fewer, or stage on Cloud Storage.')
    log.warning('%s, over Dataflow\'s %d MB limit: adding --experiments=%s (the graph '
                'goes to the staging folder instead of the request).', over,
                GRAPH_LIMIT_BYTES >> 20, UPLOAD_GRAPH)
    return [UPLOAD_GRAPH]


@dataclasses.dataclass
class Plan:
    """Everything the launcher decided, before anything runs."""
    config: TrainConfig
    job_name: str
    project: str
    region: str
    train_argv: list[str]       # pipeline.cli.train's command line (model + Beam options)
    beam_args: list[str]        # the Beam options alone
    dry_run: bool
    template_location: str | None
    machine_type: str
    max_num_workers: int
    input_bytes: int | None
    graph: GraphSize
    added_experiments: list[str]

    @property
    def output(self) -> str:
        return self.config.output.rstrip('/')

    def summary(self) -> dict:
        n = self.config.params.num_iters
        return {
            'job_name': self.job_name, 'project': self.project, 'region': self.region,
            'input': self.config.input, 'output': self.output,
            'model': f'{self.output}/model/', 'metrics': f'{self.output}/metrics.json',
            'success_marker': f'{self.output}/_SUCCESS',
            'machine_type': self.machine_type, 'max_num_workers': self.max_num_workers,
            'input_bytes': self.input_bytes, 'num_iters': n,
            'graph_bytes': self.graph.total(n),
            'graph_bytes_per_iteration': self.graph.per_iteration_bytes,
            'max_iterations': self.graph.max_iterations(GRAPH_LIMIT_BYTES),
            'max_iterations_upload_graph': self.graph.max_iterations(
                UPLOADED_GRAPH_LIMIT_BYTES),
            'added_experiments': self.added_experiments,
            'beam_args': self.beam_args,
        }


def _launcher_parser() -> argparse.ArgumentParser:
    """The options the launcher consumes itself (and passes on explicitly); what it
    leaves is the pipeline.cli.train command line (model and Beam options)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ('--project', '--region', '--bucket'):
        parser.add_argument(flag)
    parser.add_argument('--dry_run', '--dry-run', type=parse_bool, nargs='?', const=True,
                        default=False)
    parser.add_argument('--input', '--train-files', '--train_files')
    parser.add_argument('--output', '--job-dir', '--job_dir')
    return parser


def plan(argv: list[str], parser: argparse.ArgumentParser | None = None) -> Plan:
    """Parses and validates a run_dataflow.sh command line into a Plan; ConfigError
    says what is wrong. Lists the input (for worker sizing) unless --dry_run."""
    parser = parser or build_parser()
    args, rest = parser.parse_known_args(argv)
    _, passed_on = _launcher_parser().parse_known_args(argv)
    beam_args = list(split_beam_args(rest))
    cloud = cloud_options(args, beam_args)
    job_name, bucket, extra = cloud.job_name, cloud.bucket, cloud.extra
    wals = PipelineOptions(argv).view_as(WalsOptions)
    wals.input = wals.input or f'{bucket}/ratings/*'
    wals.output = wals.output or f'{bucket}/models/{job_name}'
    for flag in ('input', 'output'):
        if not getattr(wals, flag).startswith('gs://'):
            raise ConfigError(f'--{flag} must be a gs:// path: Dataflow workers cannot see '
                              f'local files (got {getattr(wals, flag)!r})')
    config = config_from_options(wals)
    given, worker, staging = cloud.given, cloud.worker, cloud.staging

    input_bytes = None
    if not args.dry_run:
        input_bytes = sum(f['size_bytes'] for f in check_inputs(config.input))
    machine_type = worker.machine_type or DEFAULT_MACHINE_TYPE
    max_workers = worker.max_num_workers or default_max_workers(input_bytes)
    if not worker.machine_type:
        extra.append(f'--machine_type={machine_type}')
    if not worker.max_num_workers:
        extra.append(f'--max_num_workers={max_workers}')
    size = measure_graph(config)
    added = check_graph(size, config.params.num_iters,
                        given.view_as(DebugOptions).experiments or [],
                        staging_on_gcs=staging.startswith('gs://'))
    extra += [f'--experiments={e}' for e in added]

    return Plan(config=config, job_name=job_name, project=args.project, region=args.region,
                train_argv=passed_on + ['--input', config.input, '--output', config.output]
                + extra,
                beam_args=beam_args + extra, dry_run=args.dry_run,
                template_location=cloud.given.view_as(GoogleCloudOptions).template_location,
                machine_type=machine_type,
                max_num_workers=max_workers, input_bytes=input_bytes, graph=size,
                added_experiments=added)


def describe(plan: Plan) -> str:
    s = plan.summary()
    n = s['num_iters']
    lines = [
        f'Dataflow job {plan.job_name} (project {plan.project}, region {plan.region})',
        f'  input     {s["input"]}' + (f' ({s["input_bytes"]:,} bytes)'
                                        if s['input_bytes'] is not None else ''),
        f'  model     {s["model"]}{{user,item,row,col}}.npy',
        f'  metrics   {s["metrics"]}',
        f'  marker    {s["success_marker"]} (written by this launcher when the job '
        'has succeeded)',
        f'  workers   {plan.machine_type}, autoscaling up to {plan.max_num_workers}',
        f'  graph     {s["graph_bytes"] / 1e6:.2f} MB for {n} iterations '
        f'({s["graph_bytes_per_iteration"] / 1e3:.1f} kB each; up to {s["max_iterations"]} '
        f'fit in {GRAPH_LIMIT_BYTES >> 20} MB, {s["max_iterations_upload_graph"]} with '
        f'{UPLOAD_GRAPH})',
        f'  console   https://console.cloud.google.com/dataflow/jobs?project={plan.project}',
    ]
    if plan.added_experiments:
        lines.append(f'  added     --experiments={",".join(plan.added_experiments)}')
    return '\n'.join(lines)


def build_job(plan: Plan):
    """Runs the DataflowRunner in dry-run or template mode (nothing is executed):
    returns the runner's result; with --dry_run its .job is the job description."""
    args = list(plan.beam_args)
    if plan.dry_run:
        args.append('--dry_run=True')
    pipeline = make_pipeline(PipelineOptions(args))
    build_pipeline(pipeline, plan.config, staging_path(plan.config.output, new_run_id()))
    return pipeline.run()


def launch(argv: list[str]) -> int:
    """run_dataflow.sh without the logging setup: plan, then dry run, template or
    submission (through pipeline.cli.train, which waits and publishes). A first argument
    `recommend` launches python -m pipeline.recommend instead (`train`: the trainer)."""
    if argv[:1] == ['recommend']:
        from pipeline.cli.recommend import launch_dataflow
        return launch_dataflow(argv[1:])
    if argv[:1] == ['train']:
        argv = argv[1:]
    parser = build_parser()
    try:
        the_plan = plan(argv, parser)
    except ConfigError as e:
        parser.error(str(e))
    print(describe(the_plan), flush=True)
    if the_plan.dry_run or the_plan.template_location:
        result = build_job(the_plan)
        if the_plan.dry_run:
            staged = len(result.job.proto_pipeline.SerializeToString())
            print(f'Dry run: built job {the_plan.job_name} ({staged:,} bytes of pipeline '
                  'graph); nothing was submitted.')
            print(dumps(the_plan.summary(), indent=2))
        else:
            print(f'Wrote the job description to {the_plan.template_location}; nothing '
                  'was run.')
        return 0
    print('Submitting. Keep this command running: it waits for the job, then publishes '
          'the model. Ctrl-C stops the waiting (nothing is published) but not the job: '
          f'cancel that with gcloud dataflow jobs cancel JOB_ID --region {the_plan.region}',
          flush=True)
    return train.main(the_plan.train_argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The job's console link, state changes and worker messages come from the
    # Dataflow runner's loggers: keep them.
    setup_logging(verbose=('apache_beam.runners.dataflow',))
    return launch(argv)


if __name__ == '__main__':
    sys.exit(main())

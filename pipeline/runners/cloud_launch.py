"""The Google Cloud part of every run_dataflow.sh launch (the trainer's,
pipeline.cli.dataflow, and the batch recommendations', pipeline.cli.recommend): the
--project/--region/--bucket flags, their checks, and the defaults filled in from
them (job name, temp and staging under the bucket, the worker package, workers)."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import pathlib
import re

from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                  SetupOptions, StandardOptions,
                                                  WorkerOptions)

from pipeline.options import ConfigError, parse_bool

SETUP_FILE = pathlib.Path(__file__).resolve().parents[2] / 'setup.py'

# Workers. Every Python SDK process (one per vCPU) holds the factor matrices as side
# inputs, (users + items) x latent_factors x 4 bytes, so memory per vCPU matters more
# than vCPUs: n1-highmem-4 gives each of its 4 processes 6.5 GB.
DEFAULT_MACHINE_TYPE = 'n1-highmem-4'
INPUT_BYTES_PER_WORKER = 256 * 1024 * 1024
MAX_WORKERS_CAP = 20
MAX_WORKERS_UNKNOWN_INPUT = 4      # --dry_run does not list the input

_BUCKET = re.compile(r'^gs://([a-z0-9][-_.a-z0-9]{1,220}[a-z0-9])(/.*)?$')
_JOB_NAME = re.compile(r'^[a-z]([-a-z0-9]{0,1022}[a-z0-9])?$')


def default_job_name(now: datetime.datetime | None = None, prefix: str = 'wals') -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f'{prefix}-' + now.strftime('%Y%m%d-%H%M%S')


def default_max_workers(input_bytes: int | None) -> int:
    if input_bytes is None:
        return MAX_WORKERS_UNKNOWN_INPUT
    return min(MAX_WORKERS_CAP, max(1, math.ceil(input_bytes / INPUT_BYTES_PER_WORKER)))


@dataclasses.dataclass
class CloudOptions:
    """The Google Cloud part of a launch, shared by every module run_dataflow.sh starts:
    the checked --project/--region/--bucket, the job name and the Beam options the
    launcher fills in (runner, job name, temp and staging under the bucket, the
    worker package)."""
    given: PipelineOptions       # the Beam options as given
    bucket: str
    job_name: str
    staging: str
    extra: list[str]             # options added to the given ones

    @property
    def worker(self) -> WorkerOptions:
        return self.given.view_as(WorkerOptions)


def cloud_options(args: argparse.Namespace, beam_args: list[str],
                  job_prefix: str = 'wals') -> CloudOptions:
    """Checks the cloud flags of a parsed command line and fills in the defaults;
    ConfigError says what is wrong."""
    given = PipelineOptions(beam_args)
    cloud = given.view_as(GoogleCloudOptions)
    runner = given.view_as(StandardOptions).runner
    if runner and runner.split('.')[-1] not in ('DataflowRunner', 'Dataflow'):
        raise ConfigError(f'run_dataflow.sh runs on Dataflow, not --runner {runner} '
                          '(use run_local.sh for the DirectRunner)')
    for name in ('project', 'region', 'bucket'):
        if not getattr(args, name):
            raise ConfigError(f'--{name} is required')
    if not _BUCKET.match(args.bucket):
        raise ConfigError(f'--bucket must be gs://BUCKET[/prefix] with a valid bucket '
                          f'name, got {args.bucket!r}')
    bucket = args.bucket.rstrip('/')
    job_name = cloud.job_name or default_job_name(prefix=job_prefix)
    if not _JOB_NAME.match(job_name):
        raise ConfigError(f'--job_name {job_name!r}: Dataflow job names are lowercase '
                          'letters, digits and dashes, starting with a letter')
    extra = [f'--project={args.project}', f'--region={args.region}']
    if not runner:
        extra.append('--runner=DataflowRunner')
    if not cloud.job_name:
        extra.append(f'--job_name={job_name}')
    if not cloud.temp_location:
        extra.append(f'--temp_location={bucket}/tmp')
    staging = cloud.staging_location or f'{bucket}/staging'
    if not cloud.staging_location:
        extra.append(f'--staging_location={staging}')
    if not given.view_as(SetupOptions).setup_file:
        if not SETUP_FILE.exists():
            raise ConfigError(f'{SETUP_FILE} not found: run from a source checkout or '
                              'pass --setup_file')
        extra.append(f'--setup_file={SETUP_FILE}')
    return CloudOptions(given=given, bucket=bucket, job_name=job_name, staging=staging,
                        extra=extra)


def add_cloud_arguments(parser: argparse.ArgumentParser) -> None:
    """--project, --region, --bucket and --dry_run (every launched module has them)."""
    cloud = parser.add_argument_group('Google Cloud')
    cloud.add_argument('--project', help='Google Cloud project ID (required).')
    cloud.add_argument('--region', help='Dataflow region, e.g. us-central1 (required).')
    cloud.add_argument('--bucket',
                       help='gs://BUCKET[/prefix] for temp and staging files and the '
                            'default input and output (required).')
    cloud.add_argument('--dry_run', '--dry-run', dest='dry_run', type=parse_bool, nargs='?',
                       const=True, default=False,
                       help='Build the whole job (graph, worker package) and print what '
                            'would run; submit nothing and touch no Cloud resource.')

"""Remote runners need storage every worker can read: a check before any work.

The rating blocks are saved once under the run's work folder (inside the staging
folder next to --output) and read back by whichever worker solves them; --input is
read by the workers too. On a remote runner (a Dask cluster given by address or
scheduler file, Dataflow) a local path is another machine's disk, unless the user
says it is a shared mount (--shared_work_dir).
"""
from __future__ import annotations

import dataclasses
import os

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.options import ConfigError, TrainConfig


class SharedStorageOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            '--shared_work_dir', action='store_true', default=False,
            help='Local paths (--input, --output and the work folder in its staging '
                 'folder) are on a file system every worker mounts at the same path '
                 '(NFS, a shared disk). Needed for a local path on a remote runner '
                 '(--dask_client_address, --dask_scheduler_file, Dataflow).')


def remote_runner(options: PipelineOptions) -> str | None:
    """Why the runner's workers may be on other machines, or None if they are not."""
    runner = options.view_as(StandardOptions).runner or 'DirectRunner'
    name = runner if isinstance(runner, str) else type(runner).__name__
    if 'Dataflow' in name:
        return name
    if 'DaskRunner' in name:
        import apache_beam.runners.dask.dask_runner  # noqa: F401 - defines its options
        opts = options.get_all_options(drop_default=True)
        if opts.get('address'):
            return f'{name} with --dask_client_address {opts["address"]}'
        if opts.get('scheduler_file'):
            return f'{name} with --dask_scheduler_file {opts["scheduler_file"]}'
    return None


def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) in (None, 'file')


def check_shared_paths(config: TrainConfig, options: PipelineOptions) -> TrainConfig:
    """ConfigError when a remote runner would get a local --input / --output that the
    user has not declared shared; with --shared_work_dir, local paths are made
    absolute (workers do not share the launcher's current folder)."""
    why = remote_runner(options)
    local = [(flag, path) for flag, path in (('--input', config.input),
                                             ('--output', config.output))
             if _is_local(path)]
    if why is None or not local:
        return config
    if not options.view_as(SharedStorageOptions).shared_work_dir:
        paths = ', '.join(f'{flag} {path}' for flag, path in local)
        raise ConfigError(
            f'the runner is remote ({why}) but {paths} is a local path: its workers '
            'could not read the input or the rating blocks saved once in the work '
            'folder (next to --output). Use a path every worker can read (gs://...), '
            'or pass --shared_work_dir if this path is on a file system every worker '
            'mounts at the same place.')
    return dataclasses.replace(
        config, **{flag[2:]: os.path.abspath(path) for flag, path in local})

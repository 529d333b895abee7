"""The one place that turns pipeline options into a Beam pipeline on a runner.

Every entry point (train, recommend, tune, and any later command) gets its pipeline
from make_pipeline, so a fix to a runner reaches all of them: today the DaskRunner
is replaced by the corrected one in dask_runner.py, the DirectRunner's FnApiRunner
no longer drops data-plane writes (beam_fixes.py), a misspelled --runner is a
ConfigError that lists the valid names, and the graph's type hints are not checked
(the graph declares none; checking them costs seconds per build).
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import (PipelineOptions, StandardOptions,
                                                  TypeOptions)
from apache_beam.runners.runner import PipelineRunner

from pipeline.options import ConfigError
from pipeline.runners import beam_fixes

DEFAULT_RUNNER = 'DirectRunner'


def runner_name(options: PipelineOptions) -> str:
    """--runner as given (a short name or a dotted class path), DirectRunner if none."""
    runner = options.view_as(StandardOptions).runner or DEFAULT_RUNNER
    return runner if isinstance(runner, str) else type(runner).__name__


def create_runner(name: str) -> PipelineRunner:
    """The runner for --runner NAME: ours where Beam's is known to be wrong, else
    Beam's own; ConfigError for a name Beam does not know."""
    if name.split('.')[-1] == 'DaskRunner':
        return _dask_runner(name)
    try:
        return beam.runners.create_runner(name)
    except ValueError as e:   # Beam's message lists its runners' names
        raise ConfigError(f'--runner {name}: {e} (or DaskRunner)') from None
    except ImportError as e:
        raise ConfigError(f'--runner {name} cannot be loaded here: {e}') from None


def _dask_runner(name: str) -> PipelineRunner:
    """The corrected DaskRunner; ConfigError naming the cause when it cannot load:
    the `dask` extra missing, or a Beam whose private names it uses have moved."""
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as e:
        raise ConfigError(f'--runner {name} needs the `dask` extra '
                          f'(pip install .[dask]): {e}') from None
    from pipeline.runners import beam_private
    missing = beam_private.missing_beam_names()
    if missing:
        raise ConfigError(
            f'--runner {name}: the corrected DaskRunner is written for Beam '
            f'{beam_private.BEAM_VERSION}, and Beam {beam_private.beam_version()} lacks '
            f'the private names it uses: {", ".join(missing)} (docs/dask-runner.md: '
            'upgrading Beam)')
    from pipeline.runners.dask_runner import DaskRunner
    return DaskRunner()


def make_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A Pipeline for these options (the runner defaulted, checked and chosen here;
    the FnApiRunner's data-plane race turned off, beam_fixes.py)."""
    beam_fixes.apply()
    name = runner_name(options)
    options.view_as(StandardOptions).runner = name
    options.view_as(TypeOptions).pipeline_type_check = False
    return beam.Pipeline(runner=create_runner(name), options=options)

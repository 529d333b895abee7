"""The private Beam names the corrected DaskRunner (dask_runner.py) relies on.

Beam does not promise these names across releases: the runner is written against
the Beam version pinned in setup.py. missing_beam_names() lists the ones the
installed Beam lacks, without importing dask_runner (whose imports would fail at
the first missing one), so that an upgrade fails with every moved name at once
(tests/test_runner_factory.py, and `--runner DaskRunner` itself). The upgrade
procedure is in docs/dask-runner.md.
"""
from __future__ import annotations

import importlib

BEAM_VERSION = '2.77'    # the version dask_runner.py is written and tested against

# (module, attribute path): what dask_runner.py uses, and for what.
BEAM_PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    # One bundle run by hand: a fresh receiver, output handler and DoFn invoker.
    ('apache_beam.runners.common', '_OutputHandler'),
    ('apache_beam.runners.common', 'DoFnContext'),
    ('apache_beam.runners.common', 'DoFnInvoker.create_invoker'),
    ('apache_beam.runners.common', 'DoFnSignature'),
    ('apache_beam.transforms.sideinputs', 'SideInputMap'),
    # Beam's Dask translation, reused where it is right and replaced where it is not.
    ('apache_beam.runners.dask.transform_evaluator', 'OneReceiver'),
    ('apache_beam.runners.dask.transform_evaluator', 'DaskBagOp'),
    ('apache_beam.runners.dask.transform_evaluator', 'NoOp'),
    ('apache_beam.runners.dask.transform_evaluator', 'Flatten'),
    ('apache_beam.runners.dask.transform_evaluator', 'TRANSLATIONS'),
    ('apache_beam.runners.dask.transform_evaluator', 'get_windowed_value'),
    ('apache_beam.runners.dask.transform_evaluator', 'defenestrate'),
    # What the workaround replaces (Beam's side inputs recompute their bag per
    # bundle, docs/dask-runner.md): gone means Beam rewrote it; check the bugs again.
    ('apache_beam.runners.dask.transform_evaluator', 'DaskBagWindowedIterator'),
    ('apache_beam.runners.dask.transform_evaluator', 'apply_dofn_to_bundle'),
    ('apache_beam.runners.dask.overrides', '_GroupByKeyOnly'),
    ('apache_beam.runners.dask.overrides', 'dask_overrides'),
    ('apache_beam.runners.dask.dask_runner', 'DaskRunner'),
    ('apache_beam.runners.dask.dask_runner', 'DaskRunnerResult'),
    ('apache_beam.runners.dask.dask_runner', 'DaskOptions._extract_bag_kwargs'),
    ('apache_beam.runners.dask.dask_runner', 'DaskOptions.get_all_options'),
)

# Instance attributes read while translating (set in __init__, so looked up on a
# real instance): 'class: attribute'.
BEAM_INSTANCE_ATTRIBUTES: tuple[str, ...] = (
    'apache_beam.pvalue.AsSingleton: _view_options',
    'apache_beam.pvalue.AsSingleton: _window_mapping_fn',
    'apache_beam.transforms.core.ParDo: raw_side_inputs',
)


def _resolve(module: str, path: str) -> None:
    obj = importlib.import_module(module)
    for part in path.split('.'):
        obj = getattr(obj, part)


def _instance(name: str):
    import apache_beam as beam
    if name.endswith('AsSingleton'):    # of a PCollection in no pipeline
        windowing = beam.transforms.core.Windowing(beam.transforms.window.GlobalWindows())
        return beam.pvalue.AsSingleton(beam.pvalue.PCollection(None, windowing=windowing))
    return beam.Map(abs)        # a ParDo


def missing_names(names: tuple[tuple[str, str], ...]) -> list[str]:
    """The (module, attribute path) pairs of names the installed Beam lacks, as
    'module.attribute'."""
    missing = []
    for module, path in names:
        try:
            _resolve(module, path)
        except (ImportError, AttributeError):
            missing.append(f'{module}.{path}')
    return missing


def missing_beam_names() -> list[str]:
    """Every name of BEAM_PRIVATE_NAMES ('module.attribute') and
    BEAM_INSTANCE_ATTRIBUTES ('class().attribute') the installed Beam lacks."""
    missing = missing_names(BEAM_PRIVATE_NAMES)
    for entry in BEAM_INSTANCE_ATTRIBUTES:
        cls, attr = entry.split(': ')
        try:
            found = hasattr(_instance(cls), attr)
        except Exception:    # noqa: BLE001 -- a Beam that cannot build one: report it
            found = False
        if not found:
            missing.append(f'{cls}().{attr}')
    return missing


def beam_version() -> str:
    import apache_beam
    return apache_beam.__version__

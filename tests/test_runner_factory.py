"""One pipeline factory for every command, and the private Beam names the corrected
DaskRunner relies on (docs/dask-runner.md). The runs on a real Dask cluster are in
tests/test_dask.py."""
from __future__ import annotations

import ast
import pathlib

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.options import ConfigError
from pipeline.runners import beam_private, factory
from tests.conftest import ROOT

pytest.importorskip('distributed', reason='the `dask` extra is not installed')

FACTORY = ROOT / 'pipeline' / 'runners' / 'factory.py'


def _pipeline_constructions(path: pathlib.Path) -> list[int]:
    """Lines of `beam.Pipeline(...)`, `Pipeline(...)` or `TestPipeline(...)` calls."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, 'id', None)
            if name in ('Pipeline', 'TestPipeline'):
                lines.append(node.lineno)
    return lines


def test_no_command_builds_its_own_pipeline():
    """Every entry point (train, recommend, tune, the Dataflow launchers' dry runs
    and templates, the graph-size estimate) gets its pipeline from make_pipeline."""
    found = {str(p.relative_to(ROOT)): lines for p in sorted((ROOT / 'pipeline').rglob('*.py'))
             if p != FACTORY and (lines := _pipeline_constructions(p))}
    assert not found, f'beam.Pipeline built outside pipeline/runners/factory.py: {found}'
    assert _pipeline_constructions(FACTORY)      # the check can see one


@pytest.mark.parametrize('name', ['DaskRunner', 'apache_beam.runners.dask.dask_runner.DaskRunner'])
def test_dask_runner_is_the_corrected_one(name):
    from pipeline.runners.dask_runner import DaskRunner
    assert type(factory.create_runner(name)) is DaskRunner
    p = factory.make_pipeline(PipelineOptions(['--runner', name]))
    assert type(p.runner) is DaskRunner


def test_a_misspelled_runner_is_a_config_error():
    with pytest.raises(ConfigError, match='DirectRunner'):
        factory.make_pipeline(PipelineOptions(['--runner', 'DirectRuner']))


def test_the_private_beam_names_are_all_there():
    """Fails on a Beam upgrade that moved any name the corrected runner uses: the
    message names them all (then follow docs/dask-runner.md, 'Upgrading Beam')."""
    missing = beam_private.missing_beam_names()
    assert not missing, (
        f'Beam {beam_private.beam_version()} lacks private names the corrected DaskRunner '
        f'(pipeline/runners/dask_runner.py, written for Beam {beam_private.BEAM_VERSION}) '
        f'uses: {", ".join(missing)}. See docs/dask-runner.md, "Upgrading Beam".')


def test_a_moved_name_is_named_by_the_check_and_by_the_runner(monkeypatch):
    from apache_beam.runners import common
    from apache_beam.runners.dask import transform_evaluator as te
    monkeypatch.delattr(te, 'OneReceiver')
    monkeypatch.delattr(common, '_OutputHandler')
    assert beam_private.missing_beam_names() == [
        'apache_beam.runners.common._OutputHandler',
        'apache_beam.runners.dask.transform_evaluator.OneReceiver']
    with pytest.raises(ConfigError) as e:
        factory.create_runner('DaskRunner')
    assert 'transform_evaluator.OneReceiver' in str(e.value)
    assert 'common._OutputHandler' in str(e.value) and 'docs/dask-runner.md' in str(e.value)


def _beam_names_used(path: pathlib.Path) -> set[tuple[str, str]]:
    """(Beam module, name) of every name dask_runner.py imports from a Beam module
    below apache_beam.runners / transforms / pvalue, or reads as an attribute of one."""
    tree = ast.parse(path.read_text())
    modules, used = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('apache_beam.'):
            for alias in node.names:
                full = f'{node.module}.{alias.name}'
                try:
                    __import__(full)
                    modules[alias.asname or alias.name] = full      # a module
                except ImportError:
                    used.add((node.module, alias.name))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules):
            used.add((modules[node.value.id], node.attr))
    return {(m, n) for m, n in used
            if m.startswith(('apache_beam.runners', 'apache_beam.transforms.sideinputs'))}


def test_every_beam_name_the_runner_uses_is_checked():
    """The list the upgrade check goes by stays that of the code."""
    listed = {(m, p.split('.')[0]) for m, p in beam_private.BEAM_PRIVATE_NAMES}
    used = _beam_names_used(ROOT / 'pipeline' / 'runners' / 'dask_runner.py')
    assert {('apache_beam.runners.dask.transform_evaluator', 'OneReceiver'),
            ('apache_beam.runners.common', '_OutputHandler')} <= used   # the scan works
    assert not used - listed, f'add to beam_private.BEAM_PRIVATE_NAMES: {sorted(used - listed)}'


class _CountAndTag(beam.DoFn):
    def start_bundle(self):
        self.seen = 0

    def process(self, x, side):
        self.seen += 1
        yield x + sum(side)
        if x % 2:
            yield beam.pvalue.TaggedOutput('odd', x)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue
        yield WindowedValue(('seen', self.seen), 0, [GlobalWindow()])


def test_a_bundle_runs_through_the_private_calls():
    """dask_runner._run_bundle with real Beam objects: the private constructors take
    the arguments it passes, each bundle has its own receiver and DoFn copy, tagged
    outputs keep their tag, finish_bundle's outputs are kept."""
    from apache_beam.runners.dask import transform_evaluator as te
    from pipeline.runners.dask_runner import _run_bundle
    side = beam.Pipeline() | beam.Create([10, 20])
    pardo = beam.ParDo(_CountAndTag(), beam.pvalue.AsList(side))
    si = pardo.side_inputs[0]
    views = [(type(si), si._view_options(), si._window_mapping_fn)]

    def bundle(*xs):
        return _run_bundle([te.get_windowed_value(x, None) for x in xs], pardo.fn, 'L', None,
                           pardo.args, pardo.kwargs, views, [10, 20])
    assert bundle(1, 2, 3) == [(None, 31), ('odd', 1), (None, 32), (None, 33), ('odd', 3),
                               (None, ('seen', 3))]
    assert bundle(4) == [(None, 34), (None, ('seen', 1))]

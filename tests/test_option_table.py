"""The one table of options (wals_core/defaults.py, pipeline/option_table.py) is what
the code uses and what the docs show: docs/options.md's table is the generated one,
every option of the trainer's command line is in the table, WalsParams' defaults and
each model's resolved defaults are the table's, and --help states each default."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli.train import build_parser as train_parser
from pipeline.cli.tune import build_parser as tune_parser
from pipeline.option_table import TRAIN, TRAIN_OPTIONS
from pipeline.options import config_from_options
from pipeline.tuning.trials import SPACES, default_trial, search_space
from tests.conftest import ROOT
from wals_core.defaults import MODELS, PARAMETER, PARAMETERS, PARAMS, model_defaults
from wals_core.params import WalsParams

sys.path.insert(0, str(ROOT / 'scripts'))
import options_table  # noqa: E402


def _flags(parser) -> dict[str, str]:
    """option string -> dest of every option of an argparse parser but --help."""
    return {flag: action.dest for action in parser._actions for flag in action.option_strings
            if action.dest != 'help'}


def test_the_docs_table_is_the_generated_one():
    text = (ROOT / 'docs' / 'options.md').read_text()
    assert options_table.current(text), 'docs/options.md lost its table markers'
    assert options_table.current(text) == options_table.section(), (
        'docs/options.md\'s options table differs from the code\'s: run '
        'python scripts/options_table.py --write')


def test_the_script_prints_the_table():
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'options_table.py')],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == options_table.section()
    assert proc.stdout.count('\n| `--') == len(TRAIN_OPTIONS)


def test_every_option_of_train_is_in_the_table_and_back():
    parsed = _flags(train_parser())
    table = {flag: o.name for o in TRAIN_OPTIONS for flag in o.flags}
    assert sorted(set(parsed) - set(table)) == [], 'train options missing from the table'
    assert sorted(set(table) - set(parsed)) == [], 'table options missing from train'
    assert all(parsed[flag] == table[flag] for flag in parsed)


def test_the_tuners_shared_options_come_from_the_table():
    parsed = _flags(tune_parser())
    # --input, --output and --overwrite are the tuner's own (a search, not a model)
    shared = {name for name in (*TRAIN, *PARAMETER) if f'--{name}' in parsed
              and name not in ('input', 'output', 'overwrite')}
    assert {'model', 'num_iters', 'wt_type', 'confidence', 'seed', 'data_type',
            'split_seed', 'relevance_threshold'} <= shared
    for name in shared:
        option = TRAIN.get(name) or PARAMETER[name]
        assert {f for f, dest in parsed.items() if dest == name} == set(option.flags), name


def test_walsparams_defaults_are_the_tables():
    fields = {f.name: f.default for f in dataclasses.fields(WalsParams)}
    assert sorted(fields) == sorted(o.name for o in PARAMS)
    assert fields == {o.name: o.value for o in PARAMS}


@pytest.mark.parametrize('model', MODELS)
@pytest.mark.parametrize('data_type', ['ratings', 'web_views'])
def test_each_models_defaults_are_the_tables(model, data_type):
    config = config_from_options(PipelineOptions(['--input', 'in', '--output', 'out',
                                                  '--model', model,
                                                  '--data_type', data_type]))
    expected = model_defaults(model)
    expected['wt_type'] = 'log' if data_type == 'web_views' else 'linear'
    assert config.params.as_dict() == expected
    assert config.seed == PARAMETER['seed'].default
    plain = {o.name: o.default for o in TRAIN_OPTIONS if not o.param and not o.flag
             and o.default is not None and o.name != 'data_type'}
    described = config.describe()
    assert {name: described[name] for name in plain} == plain


def test_the_tuners_ranges_and_first_trial_are_the_tables():
    for model in MODELS:
        ranges = {o.name: o.ranges[model] for o in PARAMETERS if model in o.ranges}
        assert SPACES[model] == ranges
        space = search_space(model)
        trial = default_trial(model, space)
        for name, value in trial.items():
            assert value == PARAMETER[name].default_for(model)
            assert space[name].low <= value <= space[name].high, (model, name)
    assert PARAMETER['latent_factors'].default_for('implicit') == 32


def test_help_states_every_default():
    text = ' '.join(train_parser().format_help().split())
    for option in TRAIN_OPTIONS:
        described = option.default_description()
        if described is not None:
            assert f'Default: {" ".join(described.split())}.' in text, option.name
    assert re.search(r'--latent_factors LATENT_FACTORS.*Default: 5 \(wals\), 32 '
                     r'\(implicit\), 10 \(explicit\)\.', text)

"""The model registry (wals_core/models.py): each --model is one class, found by name,
and no code outside the registry decides by comparing a model's name."""
from __future__ import annotations

import re

import numpy as np
import pytest

from tests.conftest import ROOT
from wals_core import objectives
from wals_core.defaults import MODELS, PARAMETER
from wals_core.models import Model, get_model, model_names, register
from wals_core.params import WalsParams

REGISTRY = ROOT / 'wals_core' / 'models.py'
# A comparison with a model's name: p.model == 'wals', 'implicit' != m, model in (...
_NAMES = '|'.join(MODELS)
SWITCH = re.compile(rf"""(==|!=)\s*['"]({_NAMES})['"]|['"]({_NAMES})['"]\s*(==|!=)"""
                    rf"""|\bmodel\s+(not\s+)?in\s*[(\[{{]|\bin\s*\(\s*['"]({_NAMES})['"]""")


def _switches(paths) -> list[str]:
    found = []
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            # the console command is called wals too (pipeline/cli/common.py)
            code = line.split('#', 1)[0].replace("COMMAND == 'wals'", '')
            if SWITCH.search(code):
                found.append(f'{path.name}:{n}: {line.strip()}')
    return found


def test_no_model_name_switch_outside_the_registry():
    paths = [p for folder in ('pipeline', 'wals_core')
             for p in sorted((ROOT / folder).rglob('*.py')) if p != REGISTRY]
    found = _switches(paths)
    assert not found, ('decide with the model object (wals_core.models.get_model), not its '
                       'name:\n' + '\n'.join(found))


def test_the_switch_pattern_finds_what_it_must(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text("if p.model == 'explicit':\n    pass\nok = 'wals' != name\n"
                   "if args.model in ('wals', 'implicit'):\n    pass\n"
                   "x = data_type == 'web_views'  # not a model\n")
    assert [line.split(':')[1] for line in _switches([bad])] == ['1', '3', '4']


def test_every_model_is_one_registered_class():
    assert model_names() == MODELS == PARAMETER['model'].choices
    for name in MODELS:
        model = get_model(name)
        assert isinstance(model, Model) and model.name == name
        assert type(model).__name__.lower() == name
    with pytest.raises(ValueError, match="unknown model 'bpr'"):
        get_model('bpr')
    with pytest.raises(ValueError, match='registered already'):
        register(type(get_model('wals'))())


def test_the_models_facts():
    wals, implicit, explicit = (get_model(m) for m in MODELS)
    assert [m.has_bias for m in (wals, implicit, explicit)] == [False, False, True]
    assert [m.predicts_ratings for m in (wals, implicit, explicit)] == [True, False, True]
    assert [m.default_metric for m in (wals, implicit, explicit)] == ['rmse', 'ndcg', 'rmse']
    assert wals.uses('unobs_weight') and not implicit.uses('unobs_weight')
    assert implicit.uses('alpha') and not explicit.uses('alpha')
    assert list(wals.search_space('log', 'log')) == ['latent_factors', 'regularization',
                                                     'unobs_weight', 'feature_wt_exp']
    assert 'epsilon' not in implicit.search_space('linear', 'linear')
    assert wals.fixed_tune_options('log', 'log') == {'wt_type': 'log'}
    assert implicit.fixed_tune_options('log', 'linear') == {'confidence': 'linear'}
    assert explicit.fixed_tune_options('log', 'log') == {}
    for model in (wals, implicit, explicit):
        assert model.defaults()['model'] == model.name


@pytest.mark.parametrize('name', MODELS)
def test_the_objective_is_the_sum_of_its_block_and_global_terms(name):
    """The model's three ways to the objective agree: the whole objective, and the
    block terms (ObjectiveTerms' per-entry weights, slices) plus the global terms."""
    from wals_core.sparse import Csr
    rng = np.random.default_rng(3)
    n_rows, n_cols, k = 7, 5, 2
    dense = rng.integers(0, 4, (n_rows, n_cols)).astype(np.float64)
    dense[dense == 0] = 0.0
    rows, cols = np.nonzero(dense)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))])
    by_row = Csr(indptr.astype(np.int64), cols.astype(np.int32), dense[rows, cols])
    p = WalsParams(model=name, latent_factors=k, regularization=0.3)
    width = objectives.stored_width(p)
    u = rng.normal(size=(n_rows, width)).astype(np.float32)
    v = rng.normal(size=(n_cols, width)).astype(np.float32)
    col_counts = np.bincount(cols, minlength=n_cols).astype(np.int64)
    mean = float(dense[rows, cols].mean())
    whole = objectives.objective(by_row, col_counts, u, v, p, mean)
    block, _ = objectives.block_objective(by_row, 0, u, v, p, col_counts, mean)
    u64, v64 = u.astype(np.float64), v.astype(np.float64)
    col_norm = objectives.count_norm(col_counts.astype(np.float64), v)
    rest = objectives.global_objective(u64.T @ u64, v64.T @ v64, p, col_norm)
    assert block + rest == pytest.approx(whole, rel=1e-5)

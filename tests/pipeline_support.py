"""Helpers for tests that run the real pipeline and compare with the in-memory trainer."""
from __future__ import annotations

import json
import pathlib

import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.options import config_from_options
from pipeline.training.run import run
from wals_core.hashing import is_test
from wals_core.init import initial_factors
from wals_core.metrics import rmse, squared_error
from wals_core import objectives
from wals_core.train import Problem, initial_state, train
from wals_core.vocab import Vocabulary, finalize_ids


def make_config(*argv: str):
    return config_from_options(PipelineOptions(list(argv)))


def run_pipeline(input_path, output, *model_args: str, beam_args=()) -> dict:
    config = make_config('--input', str(input_path), '--output', str(output), *model_args)
    return run(config, PipelineOptions(list(beam_args)))


def load_model(output) -> dict[str, np.ndarray]:
    """The model's .npy files by name (biases too, where the mode writes them)."""
    model = pathlib.Path(output) / 'model'
    return {path.stem: np.load(path, allow_pickle=False) for path in sorted(model.glob('*.npy'))}


def load_metrics(output) -> dict:
    return json.loads((pathlib.Path(output) / 'metrics.json').read_text())


def train_in_memory(path, config, test_path=None) -> dict:
    """The reference: same parse, vocabulary, split and init, trained by wals_core.train
    (any --model; explicit predictions clipped to the training range for RMSE).
    With test_path, that file is the test set (pairs with unknown IDs: cold start)."""
    data = np.loadtxt(path, dtype=str, delimiter=config.delimiter, ndmin=2)
    users, items = Vocabulary(finalize_ids(data[:, 0])), Vocabulary(finalize_ids(data[:, 1]))
    r, c = users.lookup(data[:, 0]), items.lookup(data[:, 1])
    a = data[:, 2].astype(np.float64)
    unknown = 0
    if test_path is None:
        test = is_test(users.hashes[r], items.hashes[c], config.split_seed, config.test_fraction)
        tr, tc, ta = r[~test], c[~test], a[~test]
        er, ec, ea = r[test], c[test], a[test]
    else:
        tr, tc, ta = r, c, a
        t = np.loadtxt(test_path, dtype=str, delimiter=config.delimiter, ndmin=2)
        er, ec = users.lookup_known(t[:, 0]), items.lookup_known(t[:, 1])
        known = (er >= 0) & (ec >= 0)
        unknown = int((~known).sum())
        er, ec, ea = er[known], ec[known], t[known, 2].astype(np.float64)
    p = config.params
    problem = Problem.build(tr, tc, ta, len(users), len(items), p)
    u0, v0 = initial_state(initial_factors(users.hashes, p.latent_factors, config.seed, 'row'),
                           initial_factors(items.hashes, p.latent_factors, config.seed, 'col'), p)
    u, v = train(problem, p, u0, v0)
    has_u = np.bincount(tr, minlength=len(users)) > 0
    has_i = np.bincount(tc, minlength=len(items)) > 0
    warm = has_u[er] & has_i[ec]
    mu, clip = problem.global_mean, (ta.min(), ta.max())

    def rmse_of(rows, cols, values):
        if p.model == 'implicit':
            return None
        if p.model == 'wals':
            return rmse(squared_error(rows, cols, values, u, v), len(rows))
        err = values - objectives.predict(rows, cols, u, v, p, mu, clip)
        return rmse(float(err @ err), len(rows))
    row, row_bias = objectives.split_bias(u, p)
    col, col_bias = objectives.split_bias(v, p)
    out = {
        'user': users.ids, 'item': items.ids, 'row': row, 'col': col,
        'train_rmse': rmse_of(tr, tc, ta),
        'test_rmse': rmse_of(er[warm], ec[warm], ea[warm]),
        'test_cold_start_ratings': int((~warm).sum()) + unknown,
        'train_pairs': (tr, tc), 'test_pairs': (er[warm], ec[warm], ea[warm]),
        'global_mean': mu,
    }
    if row_bias is not None:
        out.update(row_bias=row_bias, col_bias=col_bias)
    return out

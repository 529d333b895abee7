"""Helpers for tests that run the real pipeline and compare with the in-memory trainer."""
from __future__ import annotations

import json
import pathlib

import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.options import config_from_options
from pipeline.train import run
from wals_core.hashing import is_test
from wals_core.init import initial_factors
from wals_core.metrics import rmse, squared_error
from wals_core.train import Problem, train
from wals_core.vocab import Vocabulary, finalize_ids


def make_config(*argv: str):
    return config_from_options(PipelineOptions(list(argv)))


def run_pipeline(input_path, output, *model_args: str, beam_args=()) -> dict:
    config = make_config('--input', str(input_path), '--output', str(output), *model_args)
    return run(config, PipelineOptions(list(beam_args)))


def load_model(output) -> dict[str, np.ndarray]:
    model = pathlib.Path(output) / 'model'
    return {name: np.load(model / f'{name}.npy', allow_pickle=False)
            for name in ('user', 'item', 'row', 'col')}


def load_metrics(output) -> dict:
    return json.loads((pathlib.Path(output) / 'metrics.json').read_text())


def train_in_memory(path, config) -> dict:
    """The reference: same parse, vocabulary, split and init, trained by wals_core.train."""
    data = np.loadtxt(path, dtype=str, delimiter=config.delimiter, ndmin=2)
    users, items = Vocabulary(finalize_ids(data[:, 0])), Vocabulary(finalize_ids(data[:, 1]))
    r, c = users.lookup(data[:, 0]), items.lookup(data[:, 1])
    a = data[:, 2].astype(np.float64)
    test = is_test(users.hashes[r], items.hashes[c], config.split_seed, config.test_fraction)
    p = config.params
    problem = Problem.build(r[~test], c[~test], a[~test], len(users), len(items), p)
    u, v = train(problem, p, initial_factors(users.hashes, p.latent_factors, config.seed, 'row'),
                 initial_factors(items.hashes, p.latent_factors, config.seed, 'col'))
    has_u = np.bincount(r[~test], minlength=len(users)) > 0
    has_i = np.bincount(c[~test], minlength=len(items)) > 0
    warm = test & has_u[r] & has_i[c]
    return {
        'user': users.ids, 'item': items.ids, 'row': u, 'col': v,
        'train_rmse': rmse(squared_error(r[~test], c[~test], a[~test], u, v), int((~test).sum())),
        'test_rmse': rmse(squared_error(r[warm], c[warm], a[warm], u, v), int(warm.sum())),
        'test_cold_start_ratings': int((test & ~warm).sum()),
    }

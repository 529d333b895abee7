"""The model check again, in the gate: on the files of a staged model, before it is
published (pipeline/training/run.py), with what the pipeline's check found
(pipeline/training/model_check.py, its facts in the run's work folder).

The pipeline checked every row against its training data; here the files the run
is about to publish are checked for the same promises, reading them back: every
factor, bias and the global mean finite, no more all-zero vectors than the rows
the pipeline found without a target, and every metric a finite number. A model
that fails here is not published or promoted either.
"""
from __future__ import annotations

import io

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.strict_json import first_non_finite
from wals_core.model_check import count_zero_rows
from wals_core.models import get_model
from wals_core.params import WalsParams

_ROWS_PER_PASS = 1 << 20   # rows of a factor file checked at a time (memory mapped)
_NAMES = {'row': 'users', 'col': 'items'}


def _load(path: str) -> np.ndarray:
    """A saved array: memory mapped when local (a large model is checked in passes,
    not loaded), read whole elsewhere."""
    if FileSystems.get_scheme(path) in (None, 'file'):
        return np.load(path.removeprefix('file://'), mmap_mode='r', allow_pickle=False)
    with FileSystems.open(path) as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def _side(folder: str, side: str, params: WalsParams) -> tuple[int, int, int]:
    """(rows, rows with a non-finite value, all-zero rows) of one side's stored rows
    (factors, and the bias for explicit)."""
    factors = _load(f'{folder}/model/{side}.npy')
    bias = (_load(f'{folder}/model/{side}_bias.npy') if get_model(params.model).has_bias
            else None)
    nonfinite = zero = 0
    for lo in range(0, len(factors), _ROWS_PER_PASS):
        part = np.asarray(factors[lo:lo + _ROWS_PER_PASS], np.float64)
        if bias is not None:
            part = np.concatenate([part, np.asarray(bias[lo:lo + _ROWS_PER_PASS],
                                                    np.float64)[:, None]], axis=1)
        nonfinite += int(np.count_nonzero(~np.all(np.isfinite(part), axis=1)))
        zero += count_zero_rows(part)
    return len(factors), nonfinite, zero


def check_saved_model(folder: str, params: WalsParams, facts: dict | None,
                      metrics: dict) -> list[str]:
    """The problems of the model saved in `folder` (one sentence each; [] when it
    passes). facts: the pipeline check's counts (ModelCheck.facts()), or None."""
    folder = folder.rstrip('/')
    out = []
    for side in ('row', 'col'):
        rows, nonfinite, zero = _side(folder, side, params)
        name = _NAMES[side]
        if nonfinite:
            out.append(f'{nonfinite:,} of {rows:,} {name} in {folder}/model/{side}.npy have '
                       'a value that is not a finite number')
        expected = (facts or {}).get(side)
        if expected:
            allowed = expected['rows'] - expected['target_rows']
            if rows != expected['rows'] or zero > allowed:
                out.append(f'{folder}/model/{side}.npy has {zero:,} all-zero rows of '
                           f'{rows:,} where the trained model had at most {allowed:,} of '
                           f'{expected["rows"]:,} (the {name} without training ratings)')
    if get_model(params.model).has_bias:
        mean = float(_load(f'{folder}/model/global_mean.npy'))
        if not np.isfinite(mean):
            out.append(f'the global mean is {mean}')
    bad = first_non_finite(metrics)
    if bad is not None:
        out.append(f'the metric {bad[0]} is {bad[1]}')
    return out

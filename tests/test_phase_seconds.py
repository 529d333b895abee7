"""metrics.json phase_seconds past 999 iterations: per-iteration times in iteration
order (iteration_1000 comes after iteration_999, not after iteration_100)."""
from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.training.graph import TrainWals
from pipeline.training.write_model import WriteModel, phase_seconds
from tests.pipeline_support import make_config

ITERATIONS = 1001


def iteration_events(blocks_built: float, n: int) -> list[tuple[str, float]]:
    """What n iterations report: each ends 1 ms after the previous one, and
    iteration k's solves took k seconds."""
    out = []
    for it in range(1, n + 1):
        out.append((f'iteration_{it:03d}', blocks_built + it / 1000))
        out.append((f'solve_{it:03d}', float(it)))
    return out


def test_phase_seconds_orders_iterations_by_number():
    events = [('read_start', 0.0), ('blocks_built', 10.0), *iteration_events(10.0, ITERATIONS)]
    out = phase_seconds(events, now=20.0)
    assert out['per_iteration'] == [0.001] * ITERATIONS
    assert out['solve_per_iteration'] == [float(it) for it in range(1, ITERATIONS + 1)]
    assert out['iterations'] == pytest.approx(ITERATIONS / 1000)
    assert out['evaluate_and_write'] == pytest.approx(10.0 - ITERATIONS / 1000)


def test_metrics_json_of_a_1001_iteration_run(small_ratings, tmp_path):
    """The real graph and writer, with the timing events of 1,001 iterations. (The
    graph of a real 1,001-iteration run takes minutes to build and run on the
    DirectRunner, too long for every CI run.)"""
    config = make_config('--input', str(small_ratings), '--output', str(tmp_path / 'o'),
                         '--num_iters', '0', '--latent_factors', '2')

    def add_iterations(event):
        name, t = event
        return [event] + (iteration_events(t, ITERATIONS) if name == 'blocks_built' else [])

    with beam.Pipeline(options=PipelineOptions([])) as p:
        model = p | 'TrainWals' >> TrainWals(config, str(tmp_path / 'work'))
        model = model._replace(timings=model.timings | beam.FlatMap(add_iterations))
        _ = model | 'WriteModel' >> WriteModel(config, str(tmp_path / 'out'))
    phases = json.loads((tmp_path / 'out' / 'metrics.json').read_text())['phase_seconds']
    assert phases['per_iteration'] == [0.001] * ITERATIONS
    assert phases['solve_per_iteration'] == [float(it) for it in range(1, ITERATIONS + 1)]
    assert phases['iterations'] == pytest.approx(ITERATIONS / 1000, abs=1e-3)

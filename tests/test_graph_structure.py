"""The training graph as Beam records it: TrainWals' outputs and WriteModel's inputs
are named PCollections (a NamedTuple), so runners and UIs can see them."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.store.publish import staging_path
from pipeline.training.graph import TrainedModel, build_pipeline
from tests.pipeline_support import make_config


def test_trainwals_outputs_are_the_writemodel_inputs(small_ratings, tmp_path):
    config = make_config('--input', str(small_ratings), '--output', str(tmp_path / 'o'),
                         '--num_iters', '2')
    pipeline = beam.Pipeline(options=PipelineOptions([]))
    build_pipeline(pipeline, config, staging_path(config.output, 'x'))
    transforms = {t.unique_name: t for t in pipeline.to_runner_api().components.transforms
                  .values()}
    train, write = transforms['TrainWals'], transforms['WriteModel']
    assert sorted(train.outputs) == sorted(TrainedModel._fields)
    assert sorted(write.inputs) == sorted(TrainedModel._fields)
    for name in TrainedModel._fields:
        assert write.inputs[name] == train.outputs[name], name

"""What a training graph produces: TrainWals' PCollections, by name."""
from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam


class TrainedModel(NamedTuple):
    """The PCollections a TrainWals run produces (singletons unless noted). A
    NamedTuple, so that Beam records each as a named output of TrainWals."""
    users: beam.PCollection        # Vocabulary
    items: beam.PCollection        # Vocabulary
    row_factors: beam.PCollection  # Factors (explicit: bias as the last column)
    col_factors: beam.PCollection  # Factors (explicit: bias as the last column)
    evaluation: beam.PCollection   # Evaluation (RMSE sums, ranking sums, counts)
    reads: beam.PCollection        # ReadSummary (checked)
    test_reads: beam.PCollection   # ReadSummary of --test_input (checked), or None
    ratings: beam.PCollection      # RatingStats of the training ratings
    cold_start: beam.PCollection   # int: --test_input pairs with an unknown user or item
    bad_lines: beam.PCollection    # JSON text per bad line, several
    timings: beam.PCollection      # (name, wall clock) events, several
    row_blocks: beam.PCollection   # BlockRef per row block, several (seen items)
    col_counts: beam.PCollection   # int64 array: training ratings per item
    states: beam.PCollection       # IterationState per iteration (and the start)
    checkpoints: beam.PCollection  # (iteration, test metrics) with --eval_every
    comparison: beam.PCollection   # singleton: both models on the same pairs, or None
    changes: beam.PCollection      # singleton: IDs added/removed vs previous, or None
    model_check: beam.PCollection  # singleton ModelCheck of the final factors

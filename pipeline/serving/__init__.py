"""Layer 3, serving: using a published model. The one-user Python API
(recommender.py), batch recommendations (batch.py: the graph; batch_run.py: one
run) and the TensorFlow SavedModel export (export.py; TensorFlow only there).
May import: io, store, runners, errors, options, wals_core."""

"""Layer 3, training: the Beam training graph (graph.py: read, vocabularies, blocks,
alternating solves, evaluation, comparison with the previous model, writing the
model) and one training run start to finish (run.py: stage, publish, gate, promote).
The distributed vocabulary lives here because it indexes ratings into blocks and
makes initial factors per range: a stage of the training graph, not plain input.
May import: io, store, runners, errors, options, wals_core."""

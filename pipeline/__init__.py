"""WALS matrix factorization as an Apache Beam pipeline.

Packages, from the top layer down (a package imports only from layers below it,
and from its own; tests/test_layers.py checks this):

  4  cli/       the command lines: parse options, call one function, map errors
                to exit codes (`wals SUBCOMMAND`, `python -m pipeline.SUBCOMMAND`)
  3  training/  the Beam training graph and one training run, start to finish
  3  tuning/    the hyperparameter search
  3  serving/   using a model: the one-user API, batch recommendations, export
  2  io/        reading and parsing input, line accounting, vocabularies, ID lists,
                synthetic data
  2  store/     what is published and how: model files and manifest, publishing,
                the model root and LATEST, the run report
  2  runners/   options -> a pipeline on a runner (the corrected Dask runner,
                Dataflow launch options, allocator tuning)
  1  errors.py, options.py, faults.py: errors, exit codes, the options and their
     checks, the named fault points of publishing (hooks for tests only)

wals_core/ (beside this package) is the numpy math every layer may use; it never
imports Beam or this package.
"""

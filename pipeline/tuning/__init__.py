"""Layer 3, tuning: the hyperparameter search (search.py), its data (data.py: the
trainer's reading and split, gathered on one worker) and one trial (trials.py).
May import: io, store, runners, errors, options, wals_core."""

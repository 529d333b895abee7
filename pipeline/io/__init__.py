"""Layer 2, io: reading delimited input in byte ranges (read.py), parsing with every
line accounted for (parse.py, read_summary.py), the local vocabularies
(vocabulary.py), lists of IDs and ratings a person gives (id_lists.py) and the
synthetic data generator (synth.py).
May import: errors, options, wals_core."""

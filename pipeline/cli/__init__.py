"""Layer 4, the command lines: each module parses its options, calls one function of
a lower package and maps errors to exit codes (common.py). No Beam graph code here.
main.py is the `wals` command; pipeline/<name>.py are the `python -m` aliases.
May import: every package of pipeline, wals_core."""

"""`python -m pipeline.synth`: the documented alias of `wals synth` (pipeline/cli/synth.py)."""
import sys

from pipeline.cli.synth import main

if __name__ == '__main__':
    sys.exit(main())

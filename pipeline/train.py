"""`python -m pipeline.train`: the documented alias of `wals train` (pipeline/cli/train.py)."""
import sys

from pipeline.cli.train import main

if __name__ == '__main__':
    sys.exit(main())

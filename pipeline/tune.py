"""`python -m pipeline.tune`: the documented alias of `wals tune` (pipeline/cli/tune.py)."""
import sys

from pipeline.cli.tune import main

if __name__ == '__main__':
    sys.exit(main())

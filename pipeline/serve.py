"""`python -m pipeline.serve`: the documented alias of `wals serve` (pipeline/cli/serve.py)."""
import sys

from pipeline.cli.serve import main

if __name__ == '__main__':
    sys.exit(main())

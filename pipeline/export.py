"""`python -m pipeline.export`: the documented alias of `wals export` (pipeline/cli/export.py)."""
import sys

from pipeline.cli.export import main

if __name__ == '__main__':
    sys.exit(main())

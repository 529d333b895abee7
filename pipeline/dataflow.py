"""`python -m pipeline.dataflow`: the documented alias of `wals dataflow` (pipeline/cli/dataflow.py)."""
import sys

from pipeline.cli.dataflow import main

if __name__ == '__main__':
    sys.exit(main())

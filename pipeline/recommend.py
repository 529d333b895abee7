"""`python -m pipeline.recommend`: the documented alias of `wals recommend` (pipeline/cli/recommend.py)."""
import sys

from pipeline.cli.recommend import main

if __name__ == '__main__':
    sys.exit(main())

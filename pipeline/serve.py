"""`python -m pipeline.serve`: the HTTP recommendation server (pipeline/serving/server.py;
docs/serving.md)."""
import sys

from pipeline.serving.server import build_parser, main  # noqa: F401 (the entry point)

if __name__ == '__main__':
    sys.exit(main())

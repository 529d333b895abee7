"""python -m pipeline.export (wals export): a published model as a TensorFlow
SavedModel for serving (pipeline/serving/export.py says what is in it)."""
from __future__ import annotations

import argparse
import sys

from pipeline.cli.common import prog, run_command, setup_logging
from pipeline.serving.export import DEFAULT_TOP_K_MAX, export


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog('export'),
        description='Export a published model as a TensorFlow SavedModel with the '
                    'serving signatures recommend (serving_default) and similar_items.')
    parser.add_argument('--model', required=True,
                        help='The published model folder (the trainer\'s --output).')
    parser.add_argument('--output', required=True,
                        help='Export base folder; the SavedModel goes to OUTPUT/<version>/ '
                             '(TF Serving\'s --model_base_path layout).')
    parser.add_argument('--top_k_max', '--top-k-max', dest='top_k_max', type=int,
                        default=DEFAULT_TOP_K_MAX,
                        help=f'Largest k a request may ask for. Default: {DEFAULT_TOP_K_MAX}.')
    parser.add_argument('--version', type=int, default=None,
                        help='Version folder number, 1 or more (an existing version is '
                             'never replaced). Default: one more than the largest '
                             'already in --output (1 for a new folder).')
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.top_k_max < 1:
        parser.error('--top_k_max must be >= 1')
    if args.version is not None and args.version < 1:
        parser.error(f'--version must be 1 or more, got {args.version}: TF Serving serves '
                     'the highest numbered version, and 0 or less is never newer')
    # Refusals (OutputRefused, ConfigError) exit 2; UntrustedModel is a ValueError (1).
    return run_command(lambda: _export(args), parser, failed=(ValueError,))


def _export(args) -> int:
    path = export(args.model, args.output, args.top_k_max, args.version)
    print(f'SavedModel written to {path} (signatures: serving_default = recommend, '
          'similar_items)')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""`wals`: the project's one command, a subcommand per job (setup.py installs it).

    wals train --input ratings.tsv --output model     # = python -m pipeline.train ...
    wals recommend --model model --output recs        # = python -m pipeline.recommend ...
    wals tune | serve | export | dataflow | synth ...
    wals SUBCOMMAND --help

Each subcommand is the module of the same name in pipeline/cli/ (its options, its
exit codes); `python -m pipeline.<subcommand>` stays as a documented alias.
"""
from __future__ import annotations

import importlib
import sys

from pipeline.cli import common
from pipeline.errors import EXIT_USAGE

SUBCOMMANDS = {
    'train': 'Train a model on a ratings dump (to --output or a --model_root version).',
    'recommend': 'Recommendations from a model: batch files, or one user.',
    'tune': 'Search hyperparameters on a validation split.',
    'serve': 'Serve recommendations over HTTP, following a model root\'s LATEST.',
    'export': 'Export a model as a TensorFlow SavedModel.',
    'dataflow': 'Launch train (or recommend) on Google Cloud Dataflow.',
    'synth': 'Write deterministic synthetic ratings (MovieLens format).',
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = '\n'.join(f'  {name:{width}}  {text}' for name, text in SUBCOMMANDS.items())
    return (f'usage: wals SUBCOMMAND [options]   (wals SUBCOMMAND --help for its options)\n\n'
            f'WALS matrix factorization on Apache Beam.\n\nsubcommands:\n{rows}\n')


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ('-h', '--help'):
        print(usage(), end='', file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f'{usage()}\nwals: error: unknown subcommand {name!r} (choose from '
              f'{", ".join(SUBCOMMANDS)})', file=sys.stderr)
        return EXIT_USAGE
    common.COMMAND = 'wals'
    return importlib.import_module(f'pipeline.cli.{name}').main(rest)


if __name__ == '__main__':
    sys.exit(main())

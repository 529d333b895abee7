"""python -m pipeline.synth (wals synth): deterministic synthetic ratings in the
MovieLens u.data format (the generator is pipeline/io/synth.py)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import numpy as np

from pipeline.cli.common import prog, run_command
from pipeline.io.synth import PRESETS, generate_ratings, write_movielens
from pipeline.options import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog('synth'),
        description='Write deterministic synthetic ratings in the MovieLens u.data format '
                    '(user<TAB>item<TAB>rating<TAB>timestamp, sorted by user then item).')
    parser.add_argument('--output', required=True,
                        help='file to write (gzip if it ends with .gz); replaced if it exists')
    parser.add_argument('--preset', choices=sorted(PRESETS),
                        help='named shape: ' + '; '.join(
                            f'{k}: {v["num_users"]:,} users x {v["num_items"]:,} items, '
                            f'{v["num_ratings"]:,} ratings' for k, v in PRESETS.items())
                        + ' (default: sample, unless --users/--items/--ratings are given)')
    parser.add_argument('--users', type=int, help='number of users (ids 1..N); needs --items and --ratings')
    parser.add_argument('--items', type=int, help='number of items (ids 1..N); needs --users and --ratings')
    parser.add_argument('--ratings', type=int,
                        help='number of distinct (user, item) ratings, at most users x items')
    parser.add_argument('--rank', type=int, default=10,
                        help='dimension of the latent user/item vectors (default: 10)')
    parser.add_argument('--noise', type=float, default=0.5,
                        help='std of the Gaussian noise added before rounding to 1..5 (default: 0.5)')
    parser.add_argument('--user-alpha', type=float, default=1.0,
                        help='power-law exponent of user activity; 0 = uniform (default: 1.0)')
    parser.add_argument('--item-alpha', type=float, default=1.0,
                        help='power-law exponent of item popularity; 0 = uniform (default: 1.0)')
    parser.add_argument('--seed', type=int, default=0,
                        help='random seed; the same options and seed give the same file (default: 0)')
    args = parser.parse_args(argv)
    return run_command(lambda: _synth(args, parser), parser, failed=(OSError,))


def check_output_file(path: str) -> None:
    """ConfigError unless `path` can become a file: not a folder, in a folder that
    exists and can be written (the file is written beside it, then renamed)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f'--output {path} is a folder: give a file name')
    if not os.path.isdir(folder):
        raise ConfigError(f'--output {path}: the folder {folder} does not exist')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f'--output {path}: the folder {folder} cannot be written')


def _synth(args, parser: argparse.ArgumentParser) -> int:
    check_output_file(args.output)
    sizes = (args.users, args.items, args.ratings)
    if any(s is not None for s in sizes):
        if args.preset is not None:
            parser.error('give either --preset or --users/--items/--ratings, not both')
        if any(s is None for s in sizes):
            parser.error('--users, --items and --ratings go together')
        shape = dict(num_users=args.users, num_items=args.items, num_ratings=args.ratings)
    else:
        shape = PRESETS[args.preset or 'sample']

    t0 = time.perf_counter()
    try:
        arrays = generate_ratings(**shape, rank=args.rank, noise=args.noise,
                                  user_alpha=args.user_alpha, item_alpha=args.item_alpha,
                                  seed=args.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t1 = time.perf_counter()
    write_movielens(args.output, *arrays)
    t2 = time.perf_counter()
    users, items = arrays[0], arrays[1]  # sorted by user, so distinct users = 1 + changes
    n_users = int(np.count_nonzero(np.diff(users))) + 1
    n_items = int(np.count_nonzero(np.bincount(items)))
    print(f'wrote {users.size:,} ratings ({n_users:,} users, {n_items:,} items) to '
          f'{args.output} in {t2 - t0:.2f} s (generate {t1 - t0:.2f} s, write {t2 - t1:.2f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())

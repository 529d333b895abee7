"""Data sets of the benchmark, made once and cached (python bench/prepare_data.py NAME...).

NAME is 100k (MovieLens 100k read in place from ../shared, never copied) or a
preset of pipeline/io/synth.py: 1m, 10m, 20m (ml-1m, ml-10m, ml-20m shapes, seed 0).
For every data set two files live in the cache folder (default
output/bench-data/, which git ignores):

  NAME.data         ratings, MovieLens u.data format (synthetic sets only)
  NAME.split.tsv    user_index, item_index, milli_rating, is_test (all integers;
                    milli_rating = round(1000 * rating)): the same ratings with
                    dense 0-based indices in the project's vocabulary order and the
                    project's stable-hash test flag (wals_core.hashing.is_test on the
                    id_hashes of the IDs, split_seed 0, test_fraction 0.1). The peers
                    (implicit, Spark) read this, so every method trains and tests on
                    exactly the pipeline's split.
  NAME.meta.json    what made them (synth.py's sha256, preset, seed) and sizes.

A cached file is rebuilt when synth.py (or this file) changed since it was made.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A benchmark run's code snapshot (run_bench.py sets BENCH_CODE_ROOT) wins over the tree.
sys.path.insert(0, os.environ.get('BENCH_CODE_ROOT', str(ROOT)))

ML100K = ROOT.parent / 'shared' / 'data' / 'ml-100k' / 'u.data'
DEFAULT_CACHE = ROOT / 'output' / 'bench-data'
SYNTH_PRESETS = {'1m': 'ml-1m', '10m': 'ml-10m', '20m': 'ml-20m'}
ALL_SIZES = ('100k', '1m', '10m', '20m')
TEST_FRACTION = 0.1     # the trainer's defaults (pipeline/options.py)
SPLIT_SEED = 0
SYNTH_SEED = 0


def cpu_model(default: str = 'unknown') -> str:
    """The CPU's model name from /proc/cpuinfo (the benchmark reports' machine line)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return default


def _sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def paths(name: str, cache: pathlib.Path = DEFAULT_CACHE) -> dict[str, pathlib.Path]:
    raw = ML100K if name == '100k' else cache / f'{name}.data'
    return {'raw': raw, 'split': cache / f'{name}.split.tsv', 'meta': cache / f'{name}.meta.json'}


def _recipe(name: str) -> dict:
    synth = ROOT / 'pipeline' / 'synth.py'
    out = {'name': name, 'prepare_sha256': _sha(pathlib.Path(__file__)),
           'split': {'test_fraction': TEST_FRACTION, 'split_seed': SPLIT_SEED}}
    if name == '100k':
        out['source'] = str(ML100K)
    else:
        out.update(source='pipeline/io/synth.py', preset=SYNTH_PRESETS[name], seed=SYNTH_SEED,
                   synth_sha256=_sha(synth))
    return out


def read_ratings(path: pathlib.Path):
    """(user IDs int64, item IDs int64, ratings float64) of a u.data-style file."""
    import pandas as pd
    df = pd.read_csv(path, sep='\t', header=None, usecols=[0, 1, 2], names=['u', 'i', 'r'],
                     dtype={'u': np.int64, 'i': np.int64, 'r': np.float64}, engine='c')
    return df['u'].to_numpy(), df['i'].to_numpy(), df['r'].to_numpy()


def read_split(name: str, cache: pathlib.Path = DEFAULT_CACHE):
    """(user index, item index, rating, is_test, n_users, n_items) of NAME.split.tsv."""
    import pandas as pd
    p = paths(name, cache)
    meta = json.loads(p['meta'].read_text())
    df = pd.read_csv(p['split'], sep='\t', header=None, names=['u', 'i', 'r', 't'],
                     dtype=np.int64, engine='c')
    return (df['u'].to_numpy(), df['i'].to_numpy(), df['r'].to_numpy() / 1000.0,
            df['t'].to_numpy().astype(bool), meta['users'], meta['items'])


def split_indices(users: np.ndarray, items: np.ndarray):
    """Dense indices in vocabulary order and the pipeline's test flag per rating.

    Vocabularies are sorted int64 IDs (what wals_core.vocab.finalize_ids gives for
    canonical integer IDs), hashed exactly as wals_core.vocab.Vocabulary does."""
    from wals_core.hashing import is_test
    from wals_core.vocab import Vocabulary
    uv, ui = np.unique(users, return_inverse=True)
    iv, ii = np.unique(items, return_inverse=True)
    u_voc, i_voc = Vocabulary(uv), Vocabulary(iv)
    test = is_test(u_voc.hashes[ui], i_voc.hashes[ii], SPLIT_SEED, TEST_FRACTION)
    return ui.astype(np.int64), ii.astype(np.int64), test, len(uv), len(iv)


def prepare(name: str, cache: pathlib.Path = DEFAULT_CACHE, force: bool = False) -> dict:
    if name not in ALL_SIZES:
        raise SystemExit(f'unknown data set {name!r}; choose from {", ".join(ALL_SIZES)}')
    cache.mkdir(parents=True, exist_ok=True)
    p = paths(name, cache)
    recipe = _recipe(name)
    if not force and p['meta'].exists() and p['split'].exists() and p['raw'].exists():
        meta = json.loads(p['meta'].read_text())
        if meta.get('recipe') == recipe:
            return meta
        print(f'[data] {name}: recipe changed (synth.py or prepare_data.py), rebuilding',
              flush=True)
    t0 = time.time()
    if name != '100k':
        from pipeline.io.synth import PRESETS, generate_ratings, write_movielens
        arrays = generate_ratings(**PRESETS[SYNTH_PRESETS[name]], seed=SYNTH_SEED)
        write_movielens(str(p['raw']), *arrays)
        del arrays
    t1 = time.time()
    users, items, ratings = read_ratings(p['raw'])
    ui, ii, test, n_users, n_items = split_indices(users, items)
    from pipeline.io.synth import format_lines   # fast integer formatting (no Beam import)
    tmp = p['split'].with_suffix('.tmp')
    with open(tmp, 'wb') as f:
        step = 1 << 20
        for lo in range(0, len(ui), step):
            cols = [ui[lo:lo + step], ii[lo:lo + step],
                    np.rint(ratings[lo:lo + step] * 1000).astype(np.int64),  # milli-ratings
                    test[lo:lo + step].astype(np.int64)]
            f.write(format_lines(cols))
    os.replace(tmp, p['split'])
    pairs = np.unique(ui * n_items + ii).size
    meta = {'recipe': recipe, 'ratings': int(len(ui)), 'users': int(n_users),
            'items': int(n_items), 'test_ratings': int(test.sum()),
            'duplicate_pairs': int(len(ui) - pairs), 'raw_bytes': p['raw'].stat().st_size,
            'generate_seconds': round(t1 - t0, 1), 'split_seconds': round(time.time() - t1, 1)}
    p['meta'].write_text(json.dumps(meta, indent=2))
    print(f'[data] {name}: {meta["ratings"]:,} ratings, {n_users:,} users, {n_items:,} items '
          f'(generate {meta["generate_seconds"]} s, split {meta["split_seconds"]} s)', flush=True)
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('names', nargs='+', choices=ALL_SIZES)
    ap.add_argument('--cache', type=pathlib.Path, default=DEFAULT_CACHE)
    ap.add_argument('--force', action='store_true')
    args = ap.parse_args(argv)
    for name in args.names:
        prepare(name, args.cache, args.force)
    return 0


if __name__ == '__main__':
    sys.exit(main())

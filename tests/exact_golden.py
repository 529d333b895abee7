"""SHA-256 digests of the exact solver's factors on MovieLens 100k (tests/test_solve_cg.py
checks that the default, exact path stays bit-identical to the code they were made with).

    python tests/exact_golden.py ../shared/data/ml-100k/u.data > tests/data/exact_golden.json

Runs: `pipeline.train --model wals` (DirectRunner, 3 iterations; the model files
row.npy and col.npy as written) and the in-memory trainer for every mode (3
iterations; the factor arrays, biases included). Only APIs that predate the CG
solver are used, so the same file can be run with older code on PYTHONPATH.
The digests hold for one BLAS build and CPU family: `platform()` is recorded with
them and the test compares only on the same one.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import sys
import tempfile

import numpy as np

ITERS = ['--num_iters', '3']
PIPELINE_RUNS = {'pipeline-wals': ['--model', 'wals', *ITERS]}
INMEM_RUNS = {f'inmem-{m}': ['--model', m, *ITERS] for m in ('wals', 'implicit', 'explicit')}


def platform() -> dict:
    """numpy and its BLAS (version, kernel family): what float results depend on."""
    from threadpoolctl import threadpool_info
    blas = [{k: i.get(k) for k in ('internal_api', 'version', 'architecture')}
            for i in threadpool_info() if i.get('user_api') == 'blas']
    return {'numpy': np.__version__, 'blas': blas}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digests(ml100k: pathlib.Path, work: pathlib.Path) -> dict[str, dict[str, str]]:
    from tests.pipeline_support import make_config, run_pipeline, train_in_memory
    out: dict[str, dict[str, str]] = {}
    for name, args in PIPELINE_RUNS.items():
        run_pipeline(ml100k, work / name, *args)
        model = work / name / 'model'
        out[name] = {f: _sha((model / f).read_bytes()) for f in ('row.npy', 'col.npy')}
    for name, args in INMEM_RUNS.items():
        got = train_in_memory(ml100k, make_config('--input', str(ml100k), *args))
        out[name] = {key: _sha(np.ascontiguousarray(got[key]).tobytes())
                     for key in ('row', 'col', 'row_bias', 'col_bias') if key in got}
    return out


def main(argv: list[str]) -> int:
    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    with tempfile.TemporaryDirectory() as tmp:
        result = {'platform': platform(), 'digests': digests(pathlib.Path(argv[0]),
                                                             pathlib.Path(tmp))}
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))

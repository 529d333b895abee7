"""Packaging for the WALS trainer.

`install_requires` lists only what Beam workers need at run time (Dataflow's SDK
container already has apache-beam); the `local` extra adds the pinned Beam used on
the DirectRunner, `test` adds the test tools, `tune` the tuner's search library,
`dask` the DaskRunner's engine, `serve` the HTTP recommendation server
(python -m pipeline.serve), `export` TensorFlow for the SavedModel
export and `docs` the documentation site's tools.
run_local.sh / run_tests.sh install `.[local,test,tune,dask,serve,export,docs]` into .venv.
"""
import setuptools

BEAM = 'apache-beam[gcp]==2.77.0'

setuptools.setup(
    name='wals-beam',
    version='0.1.0',
    description='WALS matrix factorization as an Apache Beam pipeline',
    packages=setuptools.find_packages(include=['pipeline', 'pipeline.*', 'wals_core', 'wals_core.*']),
    python_requires='>=3.10',
    # `wals train|recommend|tune|export|dataflow|synth ...` (pipeline/cli/main.py)
    entry_points={'console_scripts': ['wals=pipeline.cli.main:main']},
    install_requires=[
        'numpy>=1.26',
        'pandas>=2.0',
        'threadpoolctl>=3.1',   # one BLAS thread inside the batched solves
        'pyarrow>=14',          # the columnar fast path of the parser (pipeline/io/parse.py)
        'matplotlib>=3.8',      # convergence.png (pipeline/store/report.py, in the launcher)
        'zstandard>=0.18',      # .zst input read on workers (pipeline/io/decompress.py)
    ],
    extras_require={
        'local': [BEAM],
        # gcp-storage-emulator: a real Cloud Storage server on 127.0.0.1 for the gs://
        # tests; wheel: lets the packaging test build the staged sdist offline.
        # schemathesis fuzzes the HTTP server from its OpenAPI document; httpx is the
        # server tests' client.
        'test': ['pytest>=8', 'hypothesis>=6', 'gcp-storage-emulator==2026.7.19',
                 'wheel>=0.40', 'schemathesis>=4.0', 'httpx>=0.27',
                 'byexample>=11'],   # byexample: the docs' examples run
        # The documentation site (mkdocs.yml): mkdocs build --strict, mkdocs serve.
        'docs': ['mkdocs-material>=9.5'],
        # python -m pipeline.tune (ask-and-tell batches, seeded TPE)
        'tune': ['optuna>=3.6'],
        # Beam's DaskRunner (pipeline/runners/dask_runner.py): what apache-beam[dask] 2.77 needs.
        'dask': ['dask[distributed]>=2024.4.2', 'distributed>=2024.4.2'],
        # python -m pipeline.serve (pipeline/serving/): the ASGI app (FastAPI, and the
        # Starlette and pydantic it is built on, which the app imports too), its server
        # (uvloop and httptools: uvicorn's fast event loop and HTTP parser; 0.51 for the
        # multi-process supervisor --workers uses, which stops on a worker that cannot
        # start), /metrics.
        'serve': ['fastapi>=0.110', 'starlette>=0.37', 'pydantic>=2.6', 'uvicorn>=0.51',
                  'uvloop>=0.19; sys_platform != "win32"', 'httptools>=0.6',
                  'prometheus-client>=0.20'],
        # python -m pipeline.export (TensorFlow SavedModel for TF Serving); never imported
        # by training. 2.18 is the first TensorFlow built for numpy 2; the CPU-only
        # wheel on Linux (it has no macOS build).
        'export': ['tensorflow-cpu>=2.18,<3; sys_platform == "linux"',
                  'tensorflow>=2.18,<3; sys_platform != "linux"'],
    },
)

"""Shared test fixtures (MovieLens 100k from ../shared, small rating files) and the
test tiers.

Tiers: every test is in the full suite (`./run_tests.sh`, what CI runs); tests that
are not marked `slow` form the fast tier (`./run_tests.sh -m "not slow"`, a few
minutes: unit tests and small pipelines). A test is slow when it is marked
@pytest.mark.slow or its module is in SLOW_MODULES below (whole-process runs,
clusters, emulators, other venvs, MovieLens end to end)."""
from __future__ import annotations

import importlib.util
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SLOW_MODULES = {
    'test_airflow_dag',       # its own venv, a real Airflow DagBag
    'test_concurrent_runs',   # several real training processes on one model root
    'test_dask',              # a dask scheduler and two workers
    'test_dataflow_job',      # Dataflow job descriptions, staged packages
    'test_distributed_vocab', # every mode twice through the pipeline
    'test_exchange',          # routed vs broadcast, every mode
    'test_export',            # TensorFlow
    'test_fault_injection',   # SIGKILL / disk full / gs:// faults at every step
    'test_gcs',               # the Cloud Storage emulator
    'test_output_safety',     # refusals and kills of real command lines, local and gs://
    'test_packaging',         # sdist and a fresh virtualenv
    'test_rerun',             # two dumps, SIGKILLs while publishing
    'test_serve',             # a real HTTP server under load
    'test_serve_fuzz',        # schemathesis over every endpoint
    'test_thread_independence',  # every mode under two BLAS thread counts
}

# Single slow tests of otherwise fast modules: (module, test function).
SLOW_TESTS = {
    ('test_cli', 'test_movielens_100k_end_to_end_meets_the_quality_bar'),
    ('test_cli', 'test_movielens_100k_mode_defaults_meet_the_issue_bars'),
    ('test_cli', 'test_wals_train_is_python_m_pipeline_train'),
    ('test_bad_input', 'test_model_from_messy_file_equals_model_from_its_good_lines'),
    ('test_bad_input', 'test_killed_run_leaves_the_earlier_model_untouched'),
    ('test_convergence', 'test_tolerance_passes_the_factors_through_once_converged'),
    ('test_convergence',
     'test_two_runs_with_vocabularies_of_one_size_map_the_previous_model_each_its_own_way'),
    ('test_pipeline', 'test_runs_are_byte_identical_across_runs_and_direct_runner_modes'),
    ('test_modes', 'test_mode_runs_are_byte_identical_across_direct_runner_modes'),
    ('test_tune', 'test_reads_and_writes_gcs'),
    ('test_docs', 'test_examples_run_and_print_what_the_page_shows'),
    ('test_solver_cg_pipeline', 'test_broadcast_and_routed_give_identical_files'),
    ('test_damaged_input', 'test_memory_stays_bounded_on_200_mb_without_a_newline'),
    ('test_multiprocessing_loss',
     'test_the_race_loses_elements_in_multi_processing_and_the_fix_stops_it'),
    ('test_bad_input', 'test_existing_model_is_kept_unless_overwrite'),
    ('test_bad_input', 'test_failed_run_leaves_the_earlier_model_untouched'),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.stem in SLOW_MODULES or \
                (item.path.stem, getattr(item, 'originalname', item.name)) in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
ML100K = ROOT.parent / 'shared' / 'data' / 'ml-100k' / 'u.data'


@pytest.fixture(scope='session')
def ml100k() -> pathlib.Path:
    if not ML100K.exists():
        if os.environ.get('CI'):
            pytest.fail(f'{ML100K} is missing (CI must have ../shared)')
        pytest.skip(f'{ML100K} not found')
    return ML100K


def write_ratings(path: pathlib.Path, users, items, ratings, delimiter: str = '\t') -> pathlib.Path:
    """A ratings file: user, item, rating, timestamp per line."""
    with open(path, 'w', encoding='utf-8') as f:
        for u, i, r in zip(users, items, ratings):
            f.write(f'{u}{delimiter}{i}{delimiter}{r}{delimiter}881250949\n')
    return path


@pytest.fixture
def small_ratings(tmp_path) -> pathlib.Path:
    """~3000 random ratings of 120 users on 80 items, no duplicate pairs."""
    rng = np.random.default_rng(7)
    pairs = rng.choice(120 * 80, size=3000, replace=False)
    users, items = pairs // 80 + 1, pairs % 80 + 1
    return write_ratings(tmp_path / 'ratings.tsv', users, items, rng.integers(1, 6, size=3000))


def _check_unchanged():
    spec = importlib.util.spec_from_file_location(
        'check_unchanged', ROOT / 'scripts' / 'check_unchanged.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def output_hashes(folder: pathlib.Path) -> dict[str, str]:
    """SHA-256 of every file of a command's output folder, as scripts/check_unchanged.py
    compares them: JSON outputs without wall-clock fields, the folder's own path
    replaced (two runs in different folders compare equal)."""
    return _check_unchanged().hash_tree(pathlib.Path(folder), str(folder))


def assert_same_outputs(a: pathlib.Path, b: pathlib.Path) -> dict[str, str]:
    """Two output folders hold the same files with the same hashes (see output_hashes)."""
    ha, hb = output_hashes(a), output_hashes(b)
    assert ha, f'{a}: no output'
    differ = sorted(f for f in set(ha) | set(hb) if ha.get(f) != hb.get(f))
    assert not differ, f'{a.name} and {b.name} differ: {differ}'
    return ha

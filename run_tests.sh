#!/usr/bin/env bash
# Runs the whole test suite (creating ./.venv first if needed).
# Extra arguments go to pytest, e.g. ./run_tests.sh -k core -x; test files or
# folders among them replace the whole suite: ./run_tests.sh tests/test_core.py
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
for arg in "$@"; do
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
    exec python -m pytest "$@"
  fi
done
exec python -m pytest tests --durations=25 "$@"

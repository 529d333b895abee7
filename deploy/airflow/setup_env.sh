#!/usr/bin/env bash
# Creates deploy/airflow/.venv: Airflow, the Apache Beam and Google providers and
# Beam, pinned in requirements.txt / requirements-nodeps.txt, to load the DAG in a real
# DagBag (tests/test_airflow_dag.py). Its own venv, like bench/.venv: Airflow never
# joins the project's dependencies. Cached: rebuilt only when a requirements file
# changed (stamp = their hash); otherwise it returns at once.
# Usage: deploy/airflow/setup_env.sh   (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
stamp="$venv/.airflow-installed"
want="$(cat "$here/requirements.txt" "$here/requirements-nodeps.txt" | sha256sum | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then
  echo "deploy/airflow/.venv is up to date"; exit 0
fi
echo "Setting up Airflow in $venv (first run only, a few minutes)..." >&2
start=$SECONDS
rm -rf "$venv"
"${PYTHON:-python3}" -m venv "$venv"
# pip's chatter goes to a log; it is shown only if the install fails.
if ! { "$venv/bin/python" -m pip install --upgrade pip &&
       "$venv/bin/python" -m pip install -r "$here/requirements.txt" &&
       "$venv/bin/python" -m pip install --no-deps -r "$here/requirements-nodeps.txt"
     } > "$venv/pip.log" 2>&1; then
  grep -v 'is ignored: it is neither' "$venv/pip.log" | tail -40 >&2
  echo "pip install failed; full log: $venv/pip.log" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "deploy/airflow/.venv ready in $((SECONDS - start)) s: Airflow $("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('apache-airflow'))")" >&2

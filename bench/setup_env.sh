#!/usr/bin/env bash
# Creates bench/.venv: the project (editable, with the pinned Beam of the `local`
# extra) plus the benchmark peers from bench/requirements.txt (implicit, pyspark,
# psutil, threadpoolctl). Re-run it after changing either file; it is idempotent.
# Usage: bench/setup_env.sh            (PYTHON=python3.11 to choose the interpreter)
# Spark needs a Java runtime (17 works): `java -version` must succeed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$here/.venv"
stamp="$venv/.bench-installed"
want="$(cat "$root/setup.py" "$here/requirements.txt" | sha256sum | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then
  echo "bench/.venv is up to date"; exit 0
fi
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install -e "$root[local]" -r "$here/requirements.txt"
echo "$want" > "$stamp"
java -version 2>&1 | head -1 || echo "warning: no java on PATH: the spark method will fail" >&2
echo "bench/.venv ready: $("$venv/bin/python" --version)"

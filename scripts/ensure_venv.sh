#!/usr/bin/env bash
# Sourced by run_local.sh and run_tests.sh: creates ./.venv with the project's
# dependencies (setup.py extras `local`, `test`, `tune`, `dask`, `serve`, `export` and `docs`) when
# it is missing or when setup.py changed since it was built, then puts it first on
# PATH.
# (sourced: the caller sets its own shell options)
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${WALS_VENV:-$_root/.venv}"
_stamp="$_venv/.wals-installed"
_want="$(sha256sum "$_root/setup.py" | cut -d' ' -f1)"
if [[ ! -x "$_venv/bin/python" ]] || [[ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]]; then
  echo "Setting up the Python environment in $_venv (first run only, about 2 minutes)..." >&2
  "${PYTHON:-python3}" -m venv "$_venv"
  # pip's chatter goes to a log; it is shown only if the install fails.
  if ! { "$_venv/bin/python" -m pip install --upgrade pip &&
         "$_venv/bin/python" -m pip install -e "$_root[local,test,tune,dask,serve,export,docs]"; } > "$_venv/pip.log" 2>&1; then
    grep -v 'is ignored: it is neither' "$_venv/pip.log" | tail -40 >&2
    echo "pip install failed; full log: $_venv/pip.log" >&2
    exit 1
  fi
  echo "$_want" > "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"

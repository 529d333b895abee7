#!/usr/bin/env bash
# Trains WALS on the DirectRunner (creating ./.venv first if needed).
#   ./run_local.sh                       # the built-in synthetic sample
#   ./run_local.sh --input ratings.tsv [--output DIR] [model options] [Beam options]
# Without --output the model goes to a new ./output/run-<timestamp>/ folder.
# Every option: ./run_local.sh --help
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/scripts/ensure_venv.sh"

has_input=false
for arg in "$@"; do
  case "$arg" in
    --input|--input=*|--train-files|--train-files=*|--train_files|--train_files=*|-h|--help)
      has_input=true ;;
  esac
done
if ! $has_input; then
  # MovieLens may not be redistributed: the sample is synthetic, made by the
  # project's deterministic generator (MovieLens 100k shaped), once.
  sample="$here/sample_data/ratings.tsv"
  if [[ ! -f "$sample" ]]; then
    mkdir -p "$(dirname "$sample")"
    python -m pipeline.synth --preset sample --output "$sample"
  fi
  set -- --input "$sample" "$@"
fi
exec python -m pipeline.train "$@"

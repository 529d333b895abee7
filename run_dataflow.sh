#!/usr/bin/env bash
# Trains WALS on Google Cloud Dataflow (creating ./.venv first if needed): the same
# data and model options as run_local.sh, plus where to run.
#   ./run_dataflow.sh --project P --region R --bucket gs://B [--input gs://...]
#       [--output gs://...] [model options] [any Beam/Dataflow option] [--dry_run]
# Defaults: input gs://B/ratings/*, output gs://B/models/<job name>, temp and staging
# under gs://B, this checkout's setup.py as the worker package. --dry_run builds the
# job without submitting it. Every option: ./run_dataflow.sh --help
# Batch recommendations from a trained model instead (python -m pipeline.recommend):
#   ./run_dataflow.sh recommend --project P --region R --bucket gs://B \
#       --model gs://B/models/M [--output gs://...] [recommend options] [--dry_run]
# (`./run_dataflow.sh train ...` names the trainer explicitly; ... recommend --help)
# Setup, costs and scaling: README, "Running on Dataflow".
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/scripts/ensure_venv.sh"
exec python -m pipeline.dataflow "$@"

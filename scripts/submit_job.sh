#!/usr/bin/env bash
# Submit a refine-ray training run to a Ray cluster as a Ray job (see scripts/submit_job.py --help).
#   scripts/submit_job.sh [--address http://127.0.0.1:8265] [--config FILE] [--follow] [key.path=value ...]
# Runs where it is called from: relative paths (the config, and paths in it) are read from there.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/submit_job.py" "$@"

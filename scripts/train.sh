#!/usr/bin/env bash
# Run a training job with the project's caches/env: scripts/train.sh --config FILE [key=value ...]
# Runs where it is called from: relative paths (the config, and paths in it) are read from there.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$ROOT/.venv/bin/refine-ray" train "$@"

#!/usr/bin/env bash
# Run a training job with the project's caches/env: scripts/train.sh [--config FILE] [key=value ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec .venv/bin/refine-ray train "$@"

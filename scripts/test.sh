#!/usr/bin/env bash
# The default test suite (CPU, real Ray / DeepSpeed / tokenizers / parquet). Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest -q "$@"

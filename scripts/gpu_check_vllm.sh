#!/usr/bin/env bash
# The prepared GPU check of the vLLM plugin (issue 21 points 6-7), one command on a CUDA machine
# whose .venv-vllm holds the CUDA build of vLLM (bash scripts/setup_vllm.sh --cuda; needs the
# package registries, so it cannot be built on an offline device):
#
#   bash scripts/gpu_check_vllm.sh            # the GPU tests, then the GPU benchmark table
#   bash scripts/gpu_check_vllm.sh --tests    # tests only (~5-10 min: each vLLM engine start compiles)
#   bash scripts/gpu_check_vllm.sh --bench    # benchmark only (DeltaNet-1.3B shape, bf16, 16K prefixes)
#
# Tests (tests/serving/test_vllm_gpu.py, marker gpu): fp32 / bf16 log-prob parity with refine_ray's
# own model, greedy equality, CUDA graphs on vs off, tensor parallel 2 vs 1 (with two GPUs), the
# rollout engine's log-probs on CUDA. Benchmark: scripts/bench_vllm_rollout.py --gpu (vLLM with and
# without prefix caching vs the fast-weight engine per sample, k=5, n=8, G=1 and 4, 5 repeats).
# Writes $OUT (default outputs/gpu_check_vllm/): tests.txt, bench_gpu.md. Not run yet on a GPU.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv-vllm/bin/python}"
OUT="${OUT:-$PWD/outputs/gpu_check_vllm}"
MODE="${1:-all}"
case "$MODE" in all|--tests|--bench) ;; *) echo "gpu_check_vllm.sh: unknown argument '$MODE' (--tests, --bench or nothing)"; exit 2 ;; esac
"$PY" -c "import torch, vllm, sys; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)" 2>/dev/null || {
  echo "gpu_check_vllm.sh: $PY has no CUDA vLLM or sees no GPU (build it with: bash scripts/setup_vllm.sh --cuda)"; exit 2; }
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
status=0
if [ "$MODE" != "--bench" ]; then
  "$PY" -m pytest -q -s -m gpu tests/serving/test_vllm_gpu.py 2>&1 | tee "$OUT/tests.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$MODE" != "--tests" ]; then
  "$PY" scripts/bench_vllm_rollout.py --gpu 2>&1 | tee "$OUT/bench_gpu.log" | grep -E '^(\||#)' > "$OUT/bench_gpu.md"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  cat "$OUT/bench_gpu.md"
fi
echo "gpu_check_vllm: wrote $OUT (status $status)"
exit $status

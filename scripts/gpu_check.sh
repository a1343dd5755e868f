#!/usr/bin/env bash
# The prepared GPU acceptance run (issue 23 point 6): the one entry point for GPU checks.
#
#   bash scripts/gpu_check.sh --prepare     # here, once: copy fla 0.6.0 and einops (pure Python) from .venv
#                                           # into .gpu_carry/ (git-ignored) and print the device command
#   bash scripts/gpu_check.sh               # on the GPU machine (torch, triton, transformers; no network):
#                                           # <= 8 min, writes ONE JSON ($OUT/gpu_check.json, else
#                                           # outputs/gpu_check/gpu_check.json) and prints its path
#   bash scripts/gpu_check.sh --cpu-smoke   # anywhere: the same flow on CPU at tiny sizes (the test suite runs it)
#   bash scripts/gpu_check.sh --bench-nsp   # on the GPU machine, optional and longer (~45 min): bench_nsp.py
#                                           # tables for random DeltaNet-340M / 1.3B in bf16 ($OUT/perf_gpu.md)
#
# The acceptance run (scripts/gpu_check.py, each part in its own process and time budget):
# fla's Triton kernels vs our PyTorch references for DeltaNet, GatedDeltaNet and LaCT in fp32 and
# bf16, prefix-shared states included (scripts/gpu_model_parity.py), and the single-process REFINE
# step on a random DeltaNet-340M at 16K tokens in bf16 with activation checkpointing off and on:
# REFINE/NTP step-time ratio and peak GPU memory (the JSON keeps a plan_gib slot per setting for
# the memory plan's prediction). This package travels as the working tree; fla and einops in the
# carried folder; nothing else is installed on the device (PYTHONPATH=.gpu_carry:.).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARRY=.gpu_carry
if [ -x .venv/bin/python ]; then PY="${PYTHON:-.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi
[ -d "$CARRY" ] && export PYTHONPATH="$CARRY:$PWD${PYTHONPATH:+:$PYTHONPATH}" || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

case "${1:-}" in
--prepare)
  [ -x .venv/bin/python ] || { echo "gpu_check --prepare: needs .venv (bash scripts/setup.sh) to copy fla from"; exit 2; }
  rm -rf "$CARRY" && mkdir -p "$CARRY"
  .venv/bin/python - "$CARRY" <<'EOF' || exit 2
import os, shutil, sys
import einops, fla
carry = sys.argv[1]
for module in (fla, einops):          # fla 0.6.0 imports einops at import time; both are pure Python
    src = os.path.dirname(module.__file__)
    shutil.copytree(src, os.path.join(carry, os.path.basename(src)),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    print(f"copied {module.__name__} {getattr(module, '__version__', '')} from {src}")
EOF
  # the carried copy is what the device imports (PYTHONPATH first), not the .venv one
  PYTHONPATH="$CARRY" .venv/bin/python -c "import fla, einops; assert fla.__file__.startswith('$PWD/$CARRY'), fla.__file__" \
    2>/dev/null || { echo "gpu_check --prepare: the carried fla does not import from $CARRY"; exit 2; }
  carry_kib=$(du -sk "$CARRY" | cut -f1)
  tree_kib=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
  echo "carry $CARRY: $((carry_kib / 1024)) MiB; working tree (tracked + untracked, not ignored): $((tree_kib / 1024)) MiB"
  if [ "$carry_kib" -gt $((60 * 1024)) ]; then echo "gpu_check --prepare: $CARRY is over 60 MiB"; exit 2; fi
  echo "device call: run(command=\"bash scripts/gpu_check.sh\", carry=[\"$CARRY\"], timeout_s=560)"
  ;;
--cpu-smoke)
  shift
  exec "$PY" scripts/gpu_check.py --cpu-smoke "$@"
  ;;
--bench-nsp)
  OUT="${OUT:-$PWD/outputs/gpu_bench}"
  mkdir -p "$OUT"
  status=0
  bench() {  # name time-limit-s bench_nsp.py-args...
    local name=$1 limit=$2; shift 2
    echo "=== $name: bench_nsp.py $* (limit ${limit}s)"
    timeout "$limit" "$PY" scripts/bench_nsp.py --device cuda "$@" --markdown "$OUT/bench_$name.md" 2>&1 \
      | tee "$OUT/bench_$name.log" | grep -v -i "warn"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "=== $name exited $rc (124 = timed out)"; status=1; }
  }
  # The smaller model first: its numbers arrive even if the larger one runs out of time. First-use
  # Triton compilation / autotuning of fla's kernels takes minutes, hence the limits
  # (LIMIT_340M, LIMIT_1P3B in seconds override them).
  bench 340m "${LIMIT_340M:-900}" --size deltanet-340m --dtype bfloat16 --lengths 4096 8192 --reps 2 --warmup 1
  bench 1p3b "${LIMIT_1P3B:-1800}" --size deltanet-1.3b --dtype bfloat16 --lengths 8192 16384 --reps 2 --warmup 1
  {
    echo "# bench_nsp on GPU ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
    for name in 340m 1p3b; do
      echo; echo "## $name"; echo
      if [ -s "$OUT/bench_$name.md" ]; then cat "$OUT/bench_$name.md"; else echo "(no result; see bench_$name.log)"; fi
    done
  } > "$OUT/perf_gpu.md"
  echo "wrote $OUT/perf_gpu.md"
  exit $status
  ;;
"")
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  exec "$PY" scripts/gpu_check.py
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh [--prepare | --cpu-smoke [--out FILE] | --bench-nsp]"; exit 2
  ;;
esac

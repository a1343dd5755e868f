#!/usr/bin/env bash
# scripts/bench_nsp.py on a CUDA GPU: NTP vs REFINE re-encode vs REFINE with prefix sharing, for
# random DeltaNet-340M and DeltaNet-1.3B in bf16 on fla's Triton kernels. A first run on an H200
# (cold Triton cache) did not finish the 340M warm-up within 100 s nor the 1.3B one within 230 s,
# likely Triton compiling/autotuning fla's kernels on first use; hence the limits below
# (LIMIT_340M, LIMIT_1P3B in seconds override them).
#
# On any Linux machine with an NVIDIA GPU and Python >= 3.10, from the repository root:
#   python3 -m venv .venv && . .venv/bin/activate
#   DS_BUILD_OPS=0 pip install -e .       # pyproject's pinned versions; torch 2.13.0 from PyPI is the CUDA build
#   bash scripts/gpu_bench_nsp.sh         # or OUT=/some/dir bash scripts/gpu_bench_nsp.sh
#
# Writes $OUT/perf_gpu.md (the tables) and $OUT/bench_*.log (full logs); $OUT defaults to
# outputs/gpu_bench. A missing prerequisite is printed as "MISSING: ..." and stops the run, except
# fla/triton: without them the bench still runs on our PyTorch kernels (its header says "kernels torch").
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/outputs/gpu_bench}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY="${PYTHON:-python3}"

"$PY" - <<'EOF' || { echo "prerequisites missing (see MISSING above); not running the bench"; exit 2; }
import importlib, sys
missing = []
for mod in ("torch", "triton", "transformers", "einops", "yaml", "numpy", "fla", "fla.ops.delta_rule",
            "transformers.initialization"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{mod} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
for mod in ("transformers", "triton", "fla"):
    try:
        print(f"  {mod} {importlib.import_module(mod).__version__}")
    except Exception:
        pass
for m in missing:
    print("MISSING:", m)
if not torch.cuda.is_available():
    print("MISSING: a CUDA device"); sys.exit(1)
if [m for m in missing if not m.startswith(("fla", "triton"))]:
    sys.exit(1)  # the model classes cannot be built without these
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

status=0
bench() {  # name time-limit-s bench_nsp.py-args...
  local name=$1 limit=$2; shift 2
  echo "=== $name: bench_nsp.py $* (limit ${limit}s)"
  timeout "$limit" "$PY" scripts/bench_nsp.py --device cuda "$@" --markdown "$OUT/bench_$name.md" 2>&1 \
    | tee "$OUT/bench_$name.log" | grep -v -i "warn"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "=== $name exited $rc (124 = timed out)"; status=1; }
}
# The smaller model first: its numbers arrive even if the larger one runs out of time.
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

#!/usr/bin/env bash
# GPU run of scripts/bench_nsp.py (NTP vs REFINE re-encode vs REFINE prefix-shared), ~5 minutes.
#
# On the device tool (from the repo root here; .whl holds fla_core/flash_linear_attention 0.6.0):
#   run(command="bash scripts/gpu_bench_nsp.sh", carry=[".whl"], timeout_s=420)
# Writes $OUT/perf_gpu.md (tables) and $OUT/bench_*.log (full logs); without $OUT, ./outputs/.
# The GPU image has torch/triton/transformers/einops/pyyaml but no fla: it is installed from the
# carried .whl. Anything still missing is printed as "MISSING: ..."; without fla's kernels the
# bench still runs (REFINE_KERNELS auto -> our PyTorch ops) and its header says "kernels torch".
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/outputs}"
mkdir -p "$OUT"
export REFINE_CACHE="${TMPDIR:-/tmp}/refine_cache" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TRITON_CACHE_DIR="$REFINE_CACHE/triton" TORCHINDUCTOR_CACHE_DIR="$REFINE_CACHE/inductor"
PY="${PYTHON:-python3}"

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
    || echo "MISSING: could not pip-install the carried .whl wheels"
else
  echo "note: no .whl folder carried (fla wheels); pass carry=['.whl'] to the device tool"
fi

"$PY" - <<'EOF' || { echo "prerequisites failed; not running the bench"; exit 2; }
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
hard = [m for m in missing if not m.startswith(("fla", "triton"))]
if hard:
    sys.exit(1)  # the model classes cannot be built without these
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

status=0
bench() {  # name timeout args...
  local name=$1 limit=$2; shift 2
  echo "=== $name: bench_nsp.py $* (limit ${limit}s)"
  timeout "$limit" "$PY" scripts/bench_nsp.py --device cuda "$@" --markdown "$OUT/bench_$name.md" 2>&1 \
    | tee "$OUT/bench_$name.log" | grep -v -i "warn"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "=== $name exited $rc (124 = timed out)"; status=1; }
}
# Small size first: quick numbers even if the big one runs out of time.
bench 340m 100 --size deltanet-340m --dtype bfloat16 --lengths 4096 8192 --reps 2 --warmup 1
bench 1p3b 230 --size deltanet-1.3b --dtype bfloat16 --lengths 8192 16384 --reps 2 --warmup 1

{
  echo "# bench_nsp on GPU ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
  for name in 340m 1p3b; do
    echo; echo "## $name"; echo
    if [ -s "$OUT/bench_$name.md" ]; then cat "$OUT/bench_$name.md"; else echo "(no result; see bench_$name.log)"; fi
  done
} > "$OUT/perf_gpu.md"
echo "wrote $OUT/perf_gpu.md"
exit $status

# Sourced by the scripts: keep every cache inside the project and stay offline for models (unless the caller sets HF_HUB_OFFLINE=0).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REFINE_CACHE="$ROOT/.cache"
export PIP_CACHE_DIR="$REFINE_CACHE/pip"
export TORCH_EXTENSIONS_DIR="$REFINE_CACHE/torch_extensions"
export TRITON_CACHE_DIR="$REFINE_CACHE/triton"
export TORCHINDUCTOR_CACHE_DIR="$REFINE_CACHE/inductor"
export HF_HOME="$REFINE_CACHE/hf"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"          # HF_HUB_OFFLINE=0 bash scripts/train.sh ... downloads hub ids
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-$HF_HUB_OFFLINE}"
export MPLCONFIGDIR="$REFINE_CACHE/matplotlib"
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/refine_ray_$(id -u)}"
export TOKENIZERS_PARALLELISM=false
export RAY_USAGE_STATS_ENABLED=0
mkdir -p "$REFINE_CACHE" "$RAY_TMPDIR"

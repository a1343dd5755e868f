"""Test-wide environment: offline hub, project-local caches, one BLAS thread."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
for var, sub in (("TORCH_EXTENSIONS_DIR", "torch_extensions"), ("TRITON_CACHE_DIR", "triton"),
                 ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("HF_HOME", "hf"), ("MPLCONFIGDIR", "matplotlib")):
    os.environ.setdefault(var, str(CACHE / sub))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"../shared/data not found beside the repo at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    from refine_ray.data import load_tokenizer

    return load_tokenizer()


# Native libraries loaded by the suite (Ray's core worker threads, gloo, Triton) have been seen
# to crash while the interpreter tears down *after* every test has passed and the summary is
# printed (exit 139 in 1 of 3 full runs). The session's own status is what counts, so the
# process ends with it once pytest is done, skipping that teardown. REFINE_HARD_EXIT=0 disables.
def pytest_sessionfinish(session, exitstatus):
    session.config._refine_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    status = getattr(config, "_refine_exitstatus", None)
    if status is not None and os.environ.get("REFINE_HARD_EXIT", "1") == "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

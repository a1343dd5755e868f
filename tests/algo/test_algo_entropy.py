import math

import pytest
import torch

from refine_ray.algo import token_entropy, token_entropy_from_hidden

LN3 = math.log(3.0)
H_QUARTER = 0.5623351446  # -(1/4 ln 1/4 + 3/4 ln 3/4)


def test_uniform_and_two_class_by_hand():
    assert token_entropy(torch.zeros(4)).item() == pytest.approx(math.log(4), abs=1e-6)
    # softmax([0, ln 3]) = [1/4, 3/4]
    assert token_entropy(torch.tensor([0.0, LN3])).item() == pytest.approx(H_QUARTER, abs=1e-6)


def test_temperature_divides_logits():
    # [0, 2 ln3] / 2 = [0, ln3]
    h = token_entropy(torch.tensor([0.0, 2 * LN3]), temperature=2.0)
    assert h.item() == pytest.approx(H_QUARTER, abs=1e-6)
    with pytest.raises(ValueError):
        token_entropy(torch.zeros(3), temperature=0.0)


def test_peaked_is_zero_and_finite():
    h = token_entropy(torch.tensor([1000.0, 0.0, -1000.0]))
    assert torch.isfinite(h) and h.item() == pytest.approx(0.0, abs=1e-6)


def test_from_hidden_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # logits = hidden
    hidden = torch.tensor([[0.0, 0.0], [LN3, 0.0]])  # [T=2, D=2]
    h = token_entropy_from_hidden(hidden, w)
    assert h.shape == (2,)
    assert h[0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert h[1].item() == pytest.approx(H_QUARTER, abs=1e-6)
    # bias shifts logits: hidden 0 + bias [0, ln3]
    hb = token_entropy_from_hidden(torch.zeros(1, 2), w, lm_head_bias=torch.tensor([0.0, LN3]))
    assert hb.item() == pytest.approx(H_QUARTER, abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 37, 4096])
def test_chunked_equals_unchunked(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 8, generator=g)
    w = torch.randn(50, 8, generator=g)
    ref = token_entropy(hidden @ w.T)
    out = token_entropy_from_hidden(hidden, w, chunk_size=chunk)
    assert out.shape == (2, 37)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out2d = token_entropy_from_hidden(hidden[1], w, chunk_size=chunk)
    torch.testing.assert_close(out2d, ref[1], atol=1e-5, rtol=1e-5)


def test_no_grad_and_dtype():
    hidden = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    out = token_entropy_from_hidden(hidden.bfloat16(), w.bfloat16())
    assert not out.requires_grad and out.dtype == torch.float32
    with pytest.raises(ValueError):
        token_entropy_from_hidden(torch.randn(3, 5), torch.randn(6, 4))


def test_masked_vocabulary_with_minus_inf_logits():
    """Tokens filtered out with a -inf logit (p = 0) drop out of the sum instead of 0 * -inf = NaN."""
    z = torch.tensor([[0.0, LN3, -math.inf, -math.inf], [-math.inf, 0.0, 0.0, -math.inf]])
    h = token_entropy(z)
    assert torch.isfinite(h).all()
    assert h.tolist() == pytest.approx([H_QUARTER, math.log(2)], abs=1e-6)

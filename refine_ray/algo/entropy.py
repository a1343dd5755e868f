"""Per-token next-token-prediction (NTP) entropy.

Convention (same as upstream ReFINE): for a forward over tokens ``ids[0:L]``,
``entropy[t]`` is the entropy of the model's predictive distribution at position
``t``, i.e. of the prediction of token ``t+1``. ``entropy[L-1]`` predicts a token
past the end of the input and is never used by cut sampling.

Deliberate difference vs upstream ReFINE: upstream ReFINE materialises a full
``[mb, S, V]`` softmax. :func:`token_entropy_from_hidden` projects the last-layer
hidden states through the LM head chunk by chunk, so at most ``[chunk_size, V]``
logits exist at once. All maths is done in float32 regardless of input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["token_entropy", "token_entropy_from_hidden"]


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits / temperature)`` over the last dim.

    ``logits [..., V] -> [...]`` float32. Uses ``H = logsumexp(z) - sum(p * z)``,
    which is finite even where some probabilities underflow to 0; tokens masked out
    with a -inf logit (p = 0) are left out of the sum rather than multiplied (0 * -inf = NaN).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    logz = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    return logz - torch.where(p > 0, p * z, torch.zeros((), dtype=z.dtype, device=z.device)).sum(dim=-1)


@torch.no_grad()
def token_entropy_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    lm_head_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token entropy from last-layer hidden states, chunked over positions.

    ``hidden`` is ``[B, T, D]`` or ``[T, D]`` and must be the LM head's input (i.e.
    after the final norm); ``lm_head_weight`` is ``[V, D]``. Returns float32
    ``[B, T]`` / ``[T]``; ``out[..., t]`` is the entropy of the prediction of token
    ``t+1``. Runs under ``no_grad``; only ``[chunk_size, V]`` logits live at once.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [T, D] or [B, T, D], got {tuple(hidden.shape)}")
    if hidden.shape[-1] != lm_head_weight.shape[-1]:
        raise ValueError(
            f"hidden dim {hidden.shape[-1]} != lm_head_weight dim {lm_head_weight.shape[-1]}"
        )
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=hidden.device)
    w = lm_head_weight.to(flat.dtype)
    b = None if lm_head_bias is None else lm_head_bias.to(flat.dtype)
    for s in range(0, flat.shape[0], chunk_size):
        logits = torch.nn.functional.linear(flat[s : s + chunk_size], w, b)
        out[s : s + chunk_size] = token_entropy(logits, temperature)
    return out.reshape(lead)

"""Depthwise causal short convolution with a cache, in pure PyTorch.

Cache convention (ours, deliberately narrower than fla's [N, D, W]): ``cache`` is
[B, D, W-1], the last W-1 *inputs* (oldest first) before the segment; zeros for an
empty history. That is exactly what the next output needs, so carrying it between
segments gives the same outputs as one pass. The fla backend pads it to fla's width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  cache: Optional[torch.Tensor] = None, activation: Optional[str] = None):
    """y_t = act(sum_w weight[:, w] * x_{t-W+1+w} + bias).

    x: [B,T,D]; weight: [D,W] or [D,1,W] (nn.Conv1d layout); cache: [B,D,W-1] or None.
    Returns (y [B,T,D], new_cache [B,D,W-1] = last W-1 inputs of cat(cache, x)).
    """
    B, T, D = x.shape
    W = weight.shape[-1]
    if cache is None:
        cache = x.new_zeros(B, D, W - 1)
    elif tuple(cache.shape) != (B, D, W - 1):
        raise ValueError(f"conv cache must have shape {(B, D, W - 1)}, got {tuple(cache.shape)}")
    xp = torch.cat([cache.to(x.dtype), x.transpose(1, 2)], dim=-1)   # [B, D, W-1+T]
    y = F.conv1d(xp, weight.reshape(D, 1, W).to(x.dtype), None if bias is None else bias.to(x.dtype), groups=D)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"causal_conv1d: unsupported activation {activation!r}")
    new_cache = xp[..., xp.shape[-1] - (W - 1):]
    return y.transpose(1, 2), new_cache

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


SHORT = 16  # segments up to this many tokens skip F.conv1d


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
    if T <= SHORT:
        # Decode steps: a weighted sum over the window. F.conv1d dispatches to oneDNN on CPU,
        # which costs ~90 us per call however few tokens it sees.
        y = (xp.unfold(2, W, 1) * weight.reshape(D, 1, W).to(x.dtype)).sum(-1)      # [B, D, T]
        if bias is not None:
            y = y + bias.to(x.dtype)[:, None]
    else:
        y = F.conv1d(xp, weight.reshape(D, 1, W).to(x.dtype), None if bias is None else bias.to(x.dtype), groups=D)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"causal_conv1d: unsupported activation {activation!r}")
    new_cache = xp[..., xp.shape[-1] - (W - 1):]
    return y.transpose(1, 2), new_cache


def _history(x: torch.Tensor, cache: Optional[torch.Tensor], width: int) -> torch.Tensor:
    """cat(cache, x) as [B, D, W-1+T]: the W-1 inputs before position p are ``[..., p:p+W-1]``."""
    B, _, D = x.shape
    prev = x.new_zeros(B, D, width - 1) if cache is None else cache.to(x.dtype)
    return torch.cat([prev, x.transpose(1, 2)], dim=-1)


def tails_at(x: torch.Tensor, cache: Optional[torch.Tensor], width: int, lengths: torch.Tensor) -> torch.Tensor:
    """The cache after ``lengths[b]`` tokens of row b of ``x [B,T,D]``: [B, D, W-1]."""
    hist = _history(x, cache, width)
    idx = lengths.to(hist.device, torch.long)[:, None] + torch.arange(width - 1, device=hist.device)
    return hist.gather(2, idx[:, None, :].expand(-1, hist.shape[1], -1))


def tails_at_positions(x: torch.Tensor, cache: Optional[torch.Tensor], width: int,
                       positions: torch.Tensor) -> torch.Tensor:
    """The caches after ``p`` tokens of every row, for each of P positions: [B, P, D, W-1]."""
    hist = _history(x, cache, width)
    windows = hist.unfold(2, width - 1, 1)                       # [B, D, T+1, W-1], window p = before p
    return windows[:, :, positions.to(hist.device, torch.long)].permute(0, 2, 1, 3)

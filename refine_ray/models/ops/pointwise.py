"""Norms and activations in pure PyTorch, matching fla 0.6.0's Triton kernels' math.

All of them compute in fp32 (fp64 stays fp64) and return the input dtype, as fla's kernels do.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6  # fla.modules.norm.l2norm default, used by use_qk_l2norm_in_kernel


def _up(x: torch.Tensor) -> torch.Tensor:
    """Upcast to at least fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (eps inside the root, like fla)."""
    xf = _up(x)
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight (+ bias)."""
    xf = _up(x)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _up(weight)
    if bias is not None:
        y = y + _up(bias)
    return y.to(x.dtype)


def rms_norm_gated(x: torch.Tensor, g: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                   activation: str = "swish") -> torch.Tensor:
    """fla's FusedRMSNormGated: rms_norm(x) * weight * act(g), act = swish/silu (g*sigmoid(g)) or sigmoid."""
    y = rms_norm(_up(x), weight, eps)
    gf = _up(g)
    if activation in ("swish", "silu"):
        y = y * gf * torch.sigmoid(gf)
    elif activation == "sigmoid":
        y = y * torch.sigmoid(gf)
    else:
        raise ValueError(f"rms_norm_gated: unsupported activation {activation!r}")
    return y.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, in fp32."""
    return (F.silu(_up(gate)) * _up(up)).to(gate.dtype)


def elu_p1(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 without cancellation (fla's ``elu_p1``)."""
    return torch.where(x >= 0, x + 1, x.clamp_max(0).exp()).to(x.dtype)


def sum_norm(x: torch.Tensor) -> torch.Tensor:
    """L1 normalisation over the last dim (DeltaNet's qk_norm='sum')."""
    return F.normalize(x, p=1, dim=-1, eps=1e-6).to(x.dtype)

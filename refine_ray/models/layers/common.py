"""Pieces every block shares, written once: RMSNorm, gated RMSNorm, short conv, SwiGLU MLP, padding check.

Module and parameter names and shapes mirror fla 0.6.0 (``fla.modules.RMSNorm``,
``FusedRMSNormGated``, ``ShortConvolution``, ``fla.modules.GatedMLP``), so state dicts are
interchangeable with fla's models and with the released LaCT checkpoints (which use fla's
modules too). Each forward dispatches to fla's Triton kernels on CUDA or to
:mod:`refine_ray.models.ops` elsewhere (``ops.dispatch``); both compute in fp32 and return
the input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ..ops import dispatch as K


class RMSNorm(nn.Module):
    """fla's RMSNorm: ``x / sqrt(mean(x^2) + eps) * weight`` over the last dim.

    Args:
        hidden_size: size D of the normalised (last) dim; ``weight`` is [D].
        eps: added inside the root (fla's default 1e-5; the models pass their config's).
        dtype: dtype of ``weight`` (None: torch's default).
    ``forward(x [..., D]) -> [..., D]`` in x's dtype, computed in fp32.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def reset_parameters(self):
        """Weight back to ones (fla's init)."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> normalised x [..., D], x's dtype."""
        return K.rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """fla's FusedRMSNormGated: ``rms_norm(x) * weight * act(g)``, act = swish/silu or sigmoid.

    Raises:
        ValueError: for another ``activation``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, activation: str = "swish"):
        super().__init__()
        if activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"unsupported gate activation {activation!r}")
        self.hidden_size, self.eps, self.activation = hidden_size, eps, activation
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def reset_parameters(self):
        """Weight back to ones (fla's init)."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """x, g [..., D] -> [..., D] in x's dtype."""
        return K.rms_norm_gated(x, g, self.weight, self.eps, self.activation)


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv with fla's parameter layout (``weight`` [C, 1, W], optional ``bias`` [C]).

    ``forward(x [B,T,C], cache [B,C,W-1] | None) -> (y [B,T,C], new cache [B,C,W-1])``: the
    cache holds the last W-1 inputs (see ``ops.conv``), so segments chain exactly.
    """

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: Optional[str] = "silu"):
        super().__init__(hidden_size, hidden_size, kernel_size, padding=kernel_size - 1, groups=hidden_size, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None):  # type: ignore[override]
        """See the class docstring."""
        return K.short_conv(x, self.weight, self.bias, cache, self.activation)


class GatedMLP(nn.Module):
    """SwiGLU MLP, fla's GatedMLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

    Sizing rule as fla: ``intermediate_size`` None -> hidden * hidden_ratio (default 4) * 2/3,
    rounded up to a multiple of 256. ``forward(x [..., D]) -> [..., D]``; the SwiGLU product
    is computed in fp32 (fla's kernel) and returned in x's dtype.

    Raises:
        ValueError: ``hidden_act`` other than 'swish' (the only one fla's GatedMLP fuses).
    """

    def __init__(self, hidden_size: int, hidden_ratio: Optional[int] = None,
                 intermediate_size: Optional[int] = None, hidden_act: str = "swish"):
        super().__init__()
        if hidden_act != "swish":
            raise ValueError(f"unsupported config option hidden_act={hidden_act!r} (only 'swish')")
        if hidden_ratio is None:
            hidden_ratio = 4
        if intermediate_size is None:
            intermediate_size = int(hidden_size * hidden_ratio * 2 / 3)
            intermediate_size = 256 * ((intermediate_size + 256 - 1) // 256)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        return self.down_proj(K.swiglu(self.gate_proj(x), self.up_proj(x)))


class PreNormBlock(GradientCheckpointingLayer):
    """fla's block: ``h = x + attn(attn_norm(x))``, then ``h + mlp(mlp_norm(h))``.

    ``attn`` is the token mixer (DeltaNet, GatedDeltaNet, LaCT layer); it returns
    ``(out [B,T,D], *extras)`` (its new layer state, kept states, ...), and the block returns
    ``(hidden [B,T,D], *extras)``; extra positional/keyword arguments go to the mixer.
    Parameter names: ``attn_norm``, ``attn``, ``mlp_norm``, ``mlp`` (fla's and LaCT's).

    Activation checkpointing, per block as fla's blocks (transformers'
    ``GradientCheckpointingLayer``): after the model's ``activation_checkpointing_enable``
    (``gradient_checkpointing_enable`` before transformers 5.25; :func:`..base.enable_checkpointing`),
    a call in training mode with gradients enabled keeps only the block's inputs and re-runs
    ``forward`` in backward. Layer states and kept states are outputs like ``hidden``, so
    gradients flow through them unchanged; without gradients (inference) the block runs as is.
    """

    def __init__(self, hidden_size: int, norm_eps: float, attn: nn.Module, mlp: nn.Module, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(hidden_size, eps=norm_eps)
        self.attn = attn
        self.mlp_norm = RMSNorm(hidden_size, eps=norm_eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, *mixer_args, **mixer_kwargs):
        """See the class docstring."""
        out, *extras = self.attn(self.attn_norm(x), *mixer_args, **mixer_kwargs)
        h = x + out
        return (h + self.mlp(self.mlp_norm(h)), *extras)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[..., H * head_dim] -> [..., H, head_dim] (a view)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // head_dim, head_dim)


def check_right_padding(attention_mask: torch.Tensor) -> None:
    """Raise unless ``attention_mask`` is a [B, T] 0/1 mask with every row ones then zeros.

    Every model's HF ``forward`` accepts right padding only: with it, causality keeps pads
    from changing real positions (no recurrence, RoPE position or chunk phase sees a pad
    before a real token); left padding would feed pads into the fast-weight updates.

    Raises:
        ValueError: one line, for a mask that is not [B, T], not 0/1, or has a 0 before a 1.
    """
    m = attention_mask.to(torch.int64)
    if m.dim() != 2:
        raise ValueError(f"attention_mask must be a [B, T] 0/1 padding mask, got shape {tuple(m.shape)}")
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("attention_mask must be 0/1")
    if bool((m[:, 1:] > m[:, :-1]).any()):
        raise ValueError("attention_mask has a 0 before a 1: right padding only (left padding would shift "
                         "positions and chunk phase and feed pads into the recurrence); right-pad, or use "
                         "forward_segment on unpadded rows")

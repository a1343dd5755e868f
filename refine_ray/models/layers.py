"""DeltaNet / GatedDeltaNet token mixers and the shared block pieces.

Module and parameter names and shapes mirror fla 0.6.0 (fla/layers/delta_net.py,
fla/layers/gated_deltanet.py, fla/modules), so state dicts are interchangeable.
The computation is the same too; each op dispatches to fla's Triton kernels on CUDA
or to :mod:`refine_ray.models.ops` elsewhere (see ``ops.dispatch``).

A mixer takes ``(x [B,T,D], layer_state dict | None)`` and returns
``(out [B,T,D], new layer_state, kept)``; the state holds ``recurrent`` [B,H,K,V]
(fp32) and, with short convs, ``conv_q`` / ``conv_k`` / ``conv_v`` tails [B,C,W-1].
Two options serve prefix sharing (see ``forward_segment`` in deltanet.py):
  * ``lengths [B]``: the returned state of row b is the state after ``lengths[b]`` tokens;
    later positions get beta = 0 (and decay 0), which leaves the delta-rule state exactly
    unchanged, and the conv tails are read at the row's length.
  * ``keep_states_at`` (P positions in [1, T]): ``kept`` is the layer state after that
    many tokens, as a dict of [B, P, ...] tensors (None when not asked).
Deliberate divergence: fla's ``use_output_norm`` config flag is ignored by fla 0.6.0's
layer (o_norm always exists); we do the same so checkpoints stay interchangeable.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import dispatch as K
from .ops.conv import tails_at, tails_at_positions
from .ops.pointwise import elu_p1, sum_norm


class RMSNorm(nn.Module):
    """fla RMSNorm parameters (``weight``), computed by ``ops.rms_norm``."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """fla FusedRMSNormGated: rms_norm(x) * weight * act(g)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, activation: str = "swish"):
        super().__init__()
        if activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"unsupported gate activation {activation!r}")
        self.hidden_size, self.eps, self.activation = hidden_size, eps, activation
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return K.rms_norm_gated(x, g, self.weight, self.eps, self.activation)


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv with fla's parameter layout (weight [C,1,W], optional bias)."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: Optional[str] = "silu"):
        super().__init__(hidden_size, hidden_size, kernel_size, padding=kernel_size - 1, groups=hidden_size, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None):  # type: ignore[override]
        return K.short_conv(x, self.weight, self.bias, cache, self.activation)


class GatedMLP(nn.Module):
    """SwiGLU MLP with fla GatedMLP's sizing rule and names."""

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
        return self.down_proj(K.swiglu(self.gate_proj(x), self.up_proj(x)))


def _split_heads(x: torch.Tensor, d: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // d, d)


class _ConvQKV(nn.Module):
    """Shared q/k/v projection + optional short conv, carrying the conv tails in the state."""

    def _qkv(self, x, state, qk_act: Optional[str], lengths=None, keep_states_at=None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new, kept = {}, {}
        if self.use_short_conv:
            st = state or {}
            convolved = []
            for name, conv, inp in (("conv_q", self.q_conv1d, q), ("conv_k", self.k_conv1d, k),
                                    ("conv_v", self.v_conv1d, v)):
                y, new[name] = conv(inp, st.get(name))
                if lengths is not None:
                    new[name] = tails_at(inp, st.get(name), self.conv_size, lengths)
                if keep_states_at is not None:
                    kept[name] = tails_at_positions(inp, st.get(name), self.conv_size, keep_states_at)
                convolved.append(y)
            q, k, v = convolved
        else:
            if qk_act == "silu":
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)
        return q, k, v, new, kept

    @staticmethod
    def _valid(x, lengths) -> Optional[torch.Tensor]:
        """[B,T,1] mask of positions before each row's length (None: all valid)."""
        if lengths is None:
            return None
        pos = torch.arange(x.shape[1], device=x.device)
        return (pos[None, :] < lengths.to(x.device)[:, None])[..., None]

    def _output(self, x, o):
        if self.use_gate:
            o = self.o_norm(o, _split_heads(self.g_proj(x), self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(*o.shape[:2], -1))


class DeltaNet(_ConvQKV):
    """DeltaNet token mixer (fla.layers.DeltaNet, 'chunk' / 'fused_recurrent' modes are the same math)."""

    def __init__(self, hidden_size: int = 1024, expand_k: float = 1.0, expand_v: float = 1.0,
                 num_heads: int = 4, use_beta: bool = True, use_gate: bool = False, use_short_conv: bool = True,
                 conv_size: int = 4, conv_bias: bool = False, allow_neg_eigval: bool = False,
                 qk_activation: str = "silu", qk_norm: str = "l2", norm_eps: float = 1e-5, layer_idx: int = 0):
        super().__init__()
        if qk_activation not in ("silu", "relu", "elu", "identity"):
            raise ValueError(f"unsupported config option qk_activation={qk_activation!r}")
        if qk_norm not in ("l2", "sum"):
            raise ValueError(f"unsupported config option qk_norm={qk_norm!r}")
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.qk_activation, self.qk_norm = qk_activation, qk_norm
        self.use_beta, self.use_gate, self.use_short_conv = use_beta, use_gate, use_short_conv
        self.allow_neg_eigval, self.conv_size = allow_neg_eigval, conv_size
        self.key_dim, self.value_dim = round(hidden_size * expand_k), round(hidden_size * expand_v)
        if not (math.isclose(hidden_size * expand_k, self.key_dim) and math.isclose(hidden_size * expand_v, self.value_dim)):
            raise ValueError("hidden_size * expand_k / expand_v must be integers")
        if self.key_dim % num_heads or self.value_dim % num_heads:
            raise ValueError(f"key/value dims must be divisible by num_heads={num_heads}")
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_beta:
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        if use_short_conv:
            qk_conv_act = "silu" if qk_activation == "silu" else None
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, qk_conv_act)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, qk_conv_act)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, conv_bias, "silu")
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps, dtype=torch.float32)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state: Optional[dict] = None, lengths: Optional[torch.Tensor] = None,
                keep_states_at: Optional[torch.Tensor] = None):
        q, k, v, new, kept = self._qkv(x, state, self.qk_activation, lengths, keep_states_at)
        q, k = _split_heads(q, self.head_k_dim), _split_heads(k, self.head_k_dim)
        v = _split_heads(v, self.head_v_dim)
        if self.qk_activation == "relu":
            q, k = q.relu(), k.relu()
        elif self.qk_activation == "elu":
            q, k = elu_p1(q), elu_p1(k)
        if self.qk_norm == "sum":
            q, k = sum_norm(q), sum_norm(k)
        beta = self.b_proj(x).sigmoid() if self.use_beta else torch.ones_like(q[..., 0])
        if self.allow_neg_eigval:
            beta = beta * 2.0
        valid = self._valid(x, lengths)
        if valid is not None:
            beta = beta * valid
        h0 = None if state is None else state["recurrent"]
        o, new["recurrent"], kept["recurrent"] = K.delta_rule(
            q, k, v, beta, h0, use_qk_l2norm=self.qk_norm == "l2", keep_states_at=keep_states_at)
        return self._output(x, o), new, (None if keep_states_at is None else kept)


class GatedDeltaNet(_ConvQKV):
    """Gated DeltaNet token mixer (fla.layers.GatedDeltaNet)."""

    def __init__(self, hidden_size: int = 2048, expand_v: float = 2, head_dim: int = 256, num_heads: int = 6,
                 num_v_heads: Optional[int] = None, use_gate: bool = True, use_short_conv: bool = True,
                 allow_neg_eigval: bool = False, conv_size: int = 4, conv_bias: bool = False,
                 norm_eps: float = 1e-5, output_gate_activation: str = "swish", layer_idx: int = 0):
        super().__init__()
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.use_gate, self.use_short_conv, self.allow_neg_eigval = use_gate, use_short_conv, allow_neg_eigval
        self.conv_size, self.head_dim, self.num_heads = conv_size, head_dim, num_heads
        self.num_v_heads = num_v_heads if num_v_heads is not None else num_heads
        self.head_k_dim, self.head_v_dim = head_dim, int(head_dim * expand_v)
        if not math.isclose(head_dim * expand_v, self.head_v_dim, rel_tol=1e-5):
            raise ValueError(f"head_dim * expand_v must be an integer, got {head_dim * expand_v}")
        if self.num_v_heads % num_heads:
            raise ValueError(f"num_v_heads={self.num_v_heads} must be a multiple of num_heads={num_heads}")
        self.key_dim, self.value_dim = num_heads * self.head_k_dim, self.num_v_heads * self.head_v_dim

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.reset_gate_parameters()
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, "silu")
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, "silu")
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, conv_bias, "silu")
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation=output_gate_activation)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps, dtype=torch.float32)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    @torch.no_grad()
    def reset_gate_parameters(self):
        """Mamba-style init as fla: A ~ U(0,16), dt log-uniform in [1e-3, 0.1], dt_bias = softplus^-1(dt)."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).log())
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor, state: Optional[dict] = None, lengths: Optional[torch.Tensor] = None,
                keep_states_at: Optional[torch.Tensor] = None):
        q, k, v, new, kept = self._qkv(x, state, "silu", lengths, keep_states_at)
        q, k = _split_heads(q, self.head_k_dim), _split_heads(k, self.head_k_dim)
        v = _split_heads(v, self.head_v_dim)
        beta = self.b_proj(x).sigmoid()
        if self.allow_neg_eigval:
            beta = beta * 2.0
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        valid = self._valid(x, lengths)
        if valid is not None:
            beta, g = beta * valid, g * valid
        h0 = None if state is None else state["recurrent"]
        o, new["recurrent"], kept["recurrent"] = K.gated_delta_rule(
            q, k, v, g, beta, h0, use_qk_l2norm=True, keep_states_at=keep_states_at)
        return self._output(x, o), new, (None if keep_states_at is None else kept)

"""The DeltaNet token mixer (fla.layers.DeltaNet) and the delta-rule mixer base it shares with GatedDeltaNet.

Sources: Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length" (DeltaNet); fla 0.6.0 ``fla/layers/delta_net.py``. Module and parameter
names and shapes mirror fla's, so state dicts are interchangeable; the computation is the
same too, each op dispatching to fla's Triton kernels on CUDA or to
:mod:`refine_ray.models.ops` elsewhere (``ops.dispatch``).

A mixer takes ``(x [B,T,D], layer_state dict | None)`` and returns
``(out [B,T,D], new layer_state, kept)``; the state holds ``recurrent`` [B,H,K,V]
(fp32) and, with short convs, ``conv_q`` / ``conv_k`` / ``conv_v`` tails [B,C,W-1].
Two options serve prefix sharing (see ``forward_segment`` in ``models/deltanet``):
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

from ..ops import dispatch as K
from ..ops.conv import tails_at, tails_at_positions
from ..ops.pointwise import elu_p1, sum_norm
from .common import GatedRMSNorm, RMSNorm, ShortConvolution, split_heads


class DeltaRuleMixer(nn.Module):
    """What the DeltaNet and GatedDeltaNet mixers share: q/k/v projections with optional short
    convs (their tails carried in the layer state), the valid-position mask for ``lengths``
    and the (gated) output norm + ``o_proj``. Subclasses build the modules and ``forward``."""

    def _qkv(self, x, state, qk_act: Optional[str], lengths=None, keep_states_at=None):
        """q [B,T,key_dim], k, v [B,T,value_dim] after the short convs (or the activations fla
        applies without them), the new conv tails and the kept ones (dicts keyed conv_q/k/v)."""
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

    # Modules are created in fla's order (q/k/v, the mixer's own projections, convs, gate,
    # norm, o_proj), so a seeded model initialises exactly as before the split.
    def _add_qkv_proj(self, hidden_size: int) -> None:
        """q_proj, k_proj [key_dim, D], v_proj [value_dim, D] (no bias, fla's names)."""
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)

    def _add_conv_and_output(self, hidden_size: int, conv_bias: bool, qk_conv_act: Optional[str], norm_eps: float,
                             gate_activation: str = "swish") -> None:
        """Short convs (with ``use_short_conv``), g_proj + gated o_norm (``use_gate``) or a
        plain fp32 o_norm, and o_proj; needs key/value dims, head_v_dim and the flags set."""
        if self.use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, self.conv_size, conv_bias, qk_conv_act)
            self.k_conv1d = ShortConvolution(self.key_dim, self.conv_size, conv_bias, qk_conv_act)
            self.v_conv1d = ShortConvolution(self.value_dim, self.conv_size, conv_bias, "silu")
        if self.use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation=gate_activation)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps, dtype=torch.float32)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    @staticmethod
    def _valid(x, lengths) -> Optional[torch.Tensor]:
        """[B,T,1] mask of positions before each row's length (None: all valid)."""
        if lengths is None:
            return None
        pos = torch.arange(x.shape[1], device=x.device)
        return (pos[None, :] < lengths.to(x.device)[:, None])[..., None]

    def _output(self, x, o):
        """(Gated) RMSNorm per value head, heads merged, ``o_proj``: o [B,T,HV,V] -> [B,T,D]."""
        if self.use_gate:
            o = self.o_norm(o, split_heads(self.g_proj(x), self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(*o.shape[:2], -1))


class DeltaNet(DeltaRuleMixer):
    """DeltaNet token mixer (fla.layers.DeltaNet; its 'chunk' / 'fused_recurrent' modes are the same math).

    Arguments as fla's layer. Raises ValueError for an unsupported ``qk_activation`` /
    ``qk_norm`` or dims that do not split into ``num_heads``.
    """

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

        self._add_qkv_proj(hidden_size)
        if use_beta:
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self._add_conv_and_output(hidden_size, conv_bias, "silu" if qk_activation == "silu" else None, norm_eps)

    def forward(self, x: torch.Tensor, state: Optional[dict] = None, lengths: Optional[torch.Tensor] = None,
                keep_states_at: Optional[torch.Tensor] = None):
        """x [B,T,D] (any float dtype) from ``state`` (None: empty) -> (out [B,T,D], new state, kept);
        see the module docstring for the state and the two prefix-sharing options."""
        q, k, v, new, kept = self._qkv(x, state, self.qk_activation, lengths, keep_states_at)
        q, k = split_heads(q, self.head_k_dim), split_heads(k, self.head_k_dim)
        v = split_heads(v, self.head_v_dim)
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

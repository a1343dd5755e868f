"""The Gated DeltaNet token mixer (fla.layers.GatedDeltaNet).

Sources: Yang, Kautz, Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta
Rule" (ICLR 2025); fla 0.6.0 ``fla/layers/gated_deltanet.py``. Parameter names, shapes and
init (Mamba-style ``A_log`` / ``dt_bias``) as fla's. State and prefix-sharing options as
the DeltaNet mixer (:mod:`.delta_net`): a decayed delta rule, so padding positions get
beta = 0 and decay 0 for ``lengths``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import dispatch as K
from .common import split_heads
from .delta_net import DeltaRuleMixer


class GatedDeltaNet(DeltaRuleMixer):
    """Gated DeltaNet token mixer (fla.layers.GatedDeltaNet).

    Arguments as fla's layer; ``num_v_heads`` (default ``num_heads``) value heads share
    q/k heads in groups (GVA). Raises ValueError for a non-integer value head dim or
    ``num_v_heads`` not a multiple of ``num_heads``.
    """

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

        self._add_qkv_proj(hidden_size)
        self.a_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.reset_gate_parameters()
        self._add_conv_and_output(hidden_size, conv_bias, "silu", norm_eps, output_gate_activation)

    @torch.no_grad()
    def reset_gate_parameters(self):
        """Mamba-style init as fla: A ~ U(0,16), dt log-uniform in [1e-3, 0.1], dt_bias = softplus^-1(dt)."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).log())
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor, state: Optional[dict] = None, lengths: Optional[torch.Tensor] = None,
                keep_states_at: Optional[torch.Tensor] = None):
        """As :meth:`DeltaNet.forward`; the decay g = -exp(A_log) * softplus(a_proj(x) + dt_bias)
        (fp32, log space) is computed here for both kernel backends."""
        q, k, v, new, kept = self._qkv(x, state, "silu", lengths, keep_states_at)
        q, k = split_heads(q, self.head_k_dim), split_heads(k, self.head_k_dim)
        v = split_heads(v, self.head_v_dim)
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

"""LaCT's token mixer: shared qkv -> sliding-window attention + a SwiGLU fast-weight branch, summed.

Source: Zhang et al. 2025, "Test-Time Training Done Right" (LaCT, large-chunk test-time
training), and its released code / LaCT-760M checkpoint. Parameter names follow that
checkpoint (``attn.qkv``, ``attn.q_norm``, ``attn.k_norm``, ``attn.o_proj``,
``attn.w0.w_left``/``w_right`` (low rank) or ``attn.w0``, ``attn.w1``, ``attn.lr_proj``,
``attn.qk_scale``/``qk_offset``, ``attn.ttt_scale_proj``, ``attn.ttt_norm``,
``attn.momentum_proj.0``); the block around it (``attn_norm``, ``mlp_norm``,
``mlp.{gate,up,down}_proj``) is ``layers.common.PreNormBlock`` with fla's GatedMLP.

Deliberate choices:
  * The block is pre-norm (attn_norm -> layer -> residual, mlp_norm -> MLP ->
    residual) as upstream's ``LaCTBlock``; the spec's "post-norm" is upstream's
    ``ttt_prenorm=False``: the fast weights are renormalised *after* each update.
  * RoPE on the fast q/k reuses the attention rotary (dim = attention head dim),
    applied to each head_dim-wide slice of a fast-weight head, as upstream does.
  * The fast-weight branch keeps its inputs and state in float32 (a state cast to
    bf16 is upcast again) and casts its output back; under an autocast context the
    matmuls follow autocast, as upstream's bf16-autocast kernels do. The fast-weight
    math itself is ``ops.fast_weight``.
  * Layer state (all batch-first): fast weights ``w0,w1,w2`` [B,H,...], momentum
    ``m0,m1,m2``, pending chunk ``pk,pv`` [B,H,P,d], ``plr`` [B,H,P,3],
    ``pgate`` [B,H,P], window cache ``attn_k,attn_v`` [B,nh,L,hd] holding the
    last L = min(offset, window-1) RoPE'd keys/values.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.fast_weight import fast_weight_scan, init_scan_state, initial_row_norms
from .attention import rope_tables, rotary, sliding_window_attention
from .common import RMSNorm

FAST_NORM_EPS = 1e-5  # eps of upstream's q_norm / k_norm / ttt_norm (fla RMSNorm default)


def inv_softplus(x: float) -> float:
    """softplus^-1(x) for x > 0 (the bias that makes softplus(0 + bias) = x)."""
    return x + math.log(-math.expm1(-x))


class LowRankFastWeight(nn.Module):
    """Initial fast weight W = w_left @ w_right + 0.5 * I, per head ([H, out, in])."""

    def __init__(self, num_heads: int, out_features: int, in_features: int, rank: int, init_gain: float):
        super().__init__()
        self.rank, self.init_gain = rank, init_gain
        self.w_left = nn.Parameter(torch.empty(num_heads, out_features, rank))
        self.w_right = nn.Parameter(torch.empty(num_heads, rank, in_features))

    def forward(self) -> torch.Tensor:
        """The initial fast weight [H, out, in] (differentiable in w_left / w_right)."""
        w = self.w_left @ self.w_right
        eye = torch.eye(w.shape[-2], w.shape[-1], device=w.device, dtype=w.dtype)
        return w + 0.5 * eye


class LaCTLayer(nn.Module):
    """The token mixer (``attn`` in the checkpoint): window attention + LaCT branch, summed, then o_proj."""

    def __init__(self, config, layer_idx: int):
        """``config``: a LaCTConfig. Raises NotImplementedError (one line listing them) for the
        upstream options not implemented; ValueError when the fast-weight head dim is not a
        multiple of the attention head dim."""
        super().__init__()
        unsupported = {
            "use_muon": config.use_muon, "ttt_prenorm": config.ttt_prenorm,
            "lr_dim != 1": config.lr_dim != 1, "ttt_loss_type != dot_product": config.ttt_loss_type != "dot_product",
            "lr_parameterization != mamba": config.lr_parameterization != "mamba",
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(f"LaCT options not implemented: {bad}")
        D = config.hidden_size
        self.layer_idx = layer_idx
        self.hidden_size = D
        self.num_heads, self.head_dim = config.num_attn_heads, config.head_dim
        self.num_fw_heads, self.fw_head_dim = config.num_lact_heads, config.fw_head_dim
        if self.fw_head_dim % self.head_dim:
            raise ValueError("fast-weight head dim must be a multiple of the attention head dim (shared RoPE)")
        self.d_h = int(self.fw_head_dim * config.inter_multi)
        self.window = config.window_size
        self.chunk_size = config.lact_chunk_size
        self.rope_theta = config.rope_theta
        self.attn_qk_norm, self.qkv_silu, self.no_v_silu = config.attn_qk_norm, config.qkv_silu, config.no_v_silu
        self.ttt_nope, self.use_momentum = config.ttt_nope, config.use_momentum
        self.learnable_ttt_scale = config.learnable_ttt_scale
        self.base_lr_inv = inv_softplus(config.base_lr)
        self.low_rank = config.w0_w2_low_rank

        self.qkv = nn.Linear(D, 3 * D, bias=config.qkv_bias)
        if self.attn_qk_norm:
            self.q_norm = RMSNorm(D, eps=FAST_NORM_EPS)
            self.k_norm = RMSNorm(D, eps=FAST_NORM_EPS)
        self.o_proj = nn.Linear(D, D, bias=False)
        H, d, h = self.num_fw_heads, self.fw_head_dim, self.d_h
        if self.low_rank > 0:
            self.w0 = LowRankFastWeight(H, h, d, self.low_rank, config.fw_init_gain)
            self.w2 = LowRankFastWeight(H, h, d, self.low_rank, config.fw_init_gain)
        else:
            self.w0 = nn.Parameter(torch.empty(H, h, d))
            self.w2 = nn.Parameter(torch.empty(H, h, d))
        self.w1 = nn.Parameter(torch.empty(H, d, h))
        self.lr_proj = nn.Linear(D, 3 * H)
        self.qk_scale = nn.Parameter(torch.ones(D, 2))
        self.qk_offset = nn.Parameter(torch.zeros(D, 2))
        if self.learnable_ttt_scale:
            self.ttt_scale_proj = nn.Linear(D, H)
        self.ttt_norm = RMSNorm(d, eps=FAST_NORM_EPS)
        if self.use_momentum:
            self.momentum_proj = nn.Sequential(nn.Linear(D, H), nn.Sigmoid())

    # -- fast weights -------------------------------------------------------
    def initial_fast_weights(self):
        """(W0 [H,h,d], W1 [H,d,h], W2 [H,h,d]): the learned initial fast weights every sequence starts from."""
        w0 = self.w0() if self.low_rank > 0 else self.w0
        w2 = self.w2() if self.low_rank > 0 else self.w2
        return w0, self.w1, w2

    def empty_state(self, batch: int, device, dtype) -> dict[str, torch.Tensor]:
        """The layer state before any token (see the module docstring); window KV in ``dtype``."""
        w0, w1, w2 = self.initial_fast_weights()
        st = init_scan_state(w0, w1, w2, batch, self.fw_head_dim, self.fw_head_dim, self.use_momentum)
        st = {k: v.unflatten(0, (batch, self.num_fw_heads)) for k, v in st.items()}
        st["attn_k"] = torch.zeros(batch, self.num_heads, 0, self.head_dim, device=device, dtype=dtype)
        st["attn_v"] = torch.zeros_like(st["attn_k"])
        return st

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H*d] -> [B*H, T, d] float32."""
        B, T, _ = x.shape
        return x.view(B, T, self.num_fw_heads, -1).transpose(1, 2).reshape(B * self.num_fw_heads, T, -1).float()

    def forward(self, x: torch.Tensor, state: Optional[dict], offset: int, need_state: bool = True, rope=None):
        """x [B,T,D] at positions offset.. from ``state`` (None: empty) -> (out [B,T,D] in x's dtype,
        new state or None when ``need_state`` is False); ``rope`` = rope_tables(...) for those
        positions (computed here when None).

        Three parts: per-token projections (every module call of the layer), the part whose
        autograd graph depends on the length and offset (window attention over the cached keys,
        the chunked fast-weight scan, the new state), and the per-token output. The middle part
        enters and leaves autograd through one node each (:func:`one_node`), so a backward
        reaches the layer's modules in an order that does not depend on the data: ZeRO-3 gathers
        a module's weights when a gradient reaches it, and every rank must gather in the same
        order whatever its documents' lengths.
        """
        B, T, D = x.shape
        if state is None:
            state = self.empty_state(B, x.device, x.dtype)
        if rope is None:
            rope = rope_tables(torch.arange(offset, offset + T, device=x.device), self.head_dim, self.rope_theta, torch.float32)
        # (1) per token: shared q/k/v, the attention's RoPE'd heads, the fast-weight inputs, rates, gate
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.attn_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        qa = rotary(q.view(B, T, self.num_heads, self.head_dim), rope).transpose(1, 2)
        ka = rotary(k.view(B, T, self.num_heads, self.head_dim), rope).transpose(1, 2)
        va = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        fq, fk, fv = self._fast_qkv(q, k, v, rope)
        lr = F.softplus(self.lr_proj(x).float() + self.base_lr_inv)          # [B, T, H*3], head-major
        lr = lr.view(B, T, self.num_fw_heads, 3).transpose(1, 2).reshape(-1, T, 3)
        gate = None
        if self.use_momentum:
            gate = self.momentum_proj(x).float().transpose(1, 2).reshape(-1, T)
        norms = initial_row_norms(*self.initial_fast_weights(), B)

        # (2) what depends on the length and offset, between two single autograd nodes
        names = list(state)
        flat = one_node(qa, ka, va, fq, fk, fv, lr, *norms, *(state[k] for k in names),
                        *(() if gate is None else (gate,)))
        qa, ka, va, fq, fk, fv, lr = flat[:7]
        norms, state = tuple(flat[7:10]), dict(zip(names, flat[10:10 + len(names)]))
        gate = flat[-1] if gate is not None else None
        # (a) sliding-window attention over [cached window | this segment]
        k_all = torch.cat([state["attn_k"].to(ka.dtype), ka], 2)
        v_all = torch.cat([state["attn_v"].to(va.dtype), va], 2)
        o = sliding_window_attention(qa, k_all, v_all, offset, offset + T - k_all.shape[2], self.window)
        # (b) the fast-weight scan
        scan_in = {k: state[k].flatten(0, 1).float() for k in state if not k.startswith("attn_")}
        fo, scan_out = fast_weight_scan(fq, fk, fv, lr, gate, scan_in, norms, self.chunk_size,
                                        final_update=need_state)
        new_state = None
        if need_state:
            new_state = {k: t.unflatten(0, (B, self.num_fw_heads)) for k, t in scan_out.items()}
            keep = k_all.shape[2] if not self.window else min(k_all.shape[2], self.window - 1)
            # clone: a view would keep the whole segment's keys alive in every stored state
            new_state["attn_k"] = k_all[:, :, k_all.shape[2] - keep:].clone()
            new_state["attn_v"] = v_all[:, :, v_all.shape[2] - keep:].clone()
        names = list(new_state or ())
        o, fo, *rest = one_node(o, fo, *(new_state[k] for k in names))
        new_state = dict(zip(names, rest)) if need_state else None

        # (3) per token: the fast-weight output's norm and scale, the output projection
        o = o.transpose(1, 2).reshape(B, T, D)
        fo = self.ttt_norm(fo).view(B, self.num_fw_heads, T, self.fw_head_dim)
        if self.learnable_ttt_scale:
            fo = fo * F.silu(self.ttt_scale_proj(x).float()).transpose(1, 2).unsqueeze(-1)
        fo = fo.transpose(1, 2).reshape(B, T, D).to(o.dtype)
        return self.o_proj(o + fo), new_state

    def _fast_qkv(self, q, k, v, rope):
        """The fast-weight branch's inputs [B*H, T, d] float32: silu, per-head L2 norm, RoPE."""
        B, T, D = q.shape
        fq = q * self.qk_scale[:, 0] + self.qk_offset[:, 0]
        fk = k * self.qk_scale[:, 1] + self.qk_offset[:, 1]
        fq, fk, fv = (t.float().view(B, T, self.num_fw_heads, self.fw_head_dim) for t in (fq, fk, v))
        if self.qkv_silu:
            fq, fk = F.silu(fq), F.silu(fk)
            if not self.no_v_silu:
                fv = F.silu(fv)
        fq = fq / (fq.norm(dim=-1, keepdim=True) + 1e-5)
        fk = fk / (fk.norm(dim=-1, keepdim=True) + 1e-5)
        if not self.ttt_nope:
            fq = rotary(fq.reshape(B, T, self.num_heads, self.head_dim), rope)
            fk = rotary(fk.reshape(B, T, self.num_heads, self.head_dim), rope)
        return tuple(self._heads(t.reshape(B, T, D)) for t in (fq, fk, fv))


class _OneNode(torch.autograd.Function):
    """Identity on several tensors as ONE autograd node (see :func:`one_node`)."""

    @staticmethod
    def forward(ctx, *tensors):
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        return grads


def one_node(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` unchanged (views), as the outputs of a single autograd node.

    In backward that node runs once every gradient of its outputs is complete (an unused
    output counts as a zero gradient), then hands all of them back at once; and every output
    requires a gradient when any input does. Wrapped around a computation whose graph
    depends on the data (LaCT's chunk loop, window and pending-chunk state), it makes the
    order in which backward leaves it, and which tensors get gradients, the same for every
    input length: the computation inside runs as one step between the two nodes, with no
    module call and no parameter inside. No copy, no change in values or gradients.
    """
    return _OneNode.apply(*tensors)

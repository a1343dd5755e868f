"""Attention mixers and RoPE: the sliding-window attention of LaCT and Llama's KV-cache attention.

Sources: RoPE (Su et al. 2021, non-interleaved half rotation as transformers and fla);
LaCT's window attention (Zhang et al. 2025, "Test-Time Training Done Right"; upstream
LaCT's ``SWA`` branch); Llama attention (transformers' ``LlamaAttention``). Both run on
``F.scaled_dot_product_attention`` with explicit boolean masks (no flash-attn dependency),
and both keep their KV cache batch first, so a :class:`~refine_ray.models.base.ModelState`
can batch, branch and transport it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
# transformers' own RoPE / GQA helpers, so the Llama path is bit-compatible with its forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


def rope_tables(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """(cos, sin) [T, dim] for non-interleaved RoPE at absolute ``positions`` [T] (long), computed
    in fp32 and cast to ``dtype``; computed once per segment and shared by all layers."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    ang = positions.to(torch.float32)[:, None] * inv_freq[None]
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotary(x: torch.Tensor, rope) -> torch.Tensor:
    """Apply RoPE tables (cos, sin) [T, d] to x [B, T, n, d]; returns [B, T, n, d] in x's dtype."""
    cos, sin = (t[None, :, None].to(x.dtype) for t in rope)
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def sliding_window_attention(q, k, v, q_start: int, k_start: int, window: Optional[int]):
    """Causal attention with a band: query at position i sees keys j with i-window < j <= i.

    q [B,n,T,d] at absolute positions q_start.., k/v [B,n,S,d] at k_start.. (S >= T).
    Queries go in blocks of ``window`` rows, each against only the keys it can
    see, with an explicit boolean band mask (SDPA; no flash-attn dependency).
    ``window`` None or 0: plain causal attention. Returns [B,n,T,d] in q's dtype.
    """
    T = q.shape[2]
    block = window if window else max(T, 1)
    outs = []
    for s in range(0, T, block):
        e = min(T, s + block)
        lo = k_start if not window else max(k_start, q_start + s - window + 1)
        hi = q_start + e
        qpos = torch.arange(q_start + s, q_start + e, device=q.device)
        kpos = torch.arange(lo, hi, device=q.device)
        diff = qpos[:, None] - kpos[None, :]
        mask = diff >= 0
        if window:
            mask = mask & (diff < window)
        ks, vs = k[:, :, lo - k_start: hi - k_start], v[:, :, lo - k_start: hi - k_start]
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], ks, vs, attn_mask=mask))
    return torch.cat(outs, 2)


def kv_cache_attention(attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       past: Optional[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One transformers ``LlamaAttention`` module's attention on ``h [B,T,C]`` continuing ``past``.

    cos, sin: RoPE tables for the T positions (the backbone's ``rotary_emb``); past: None or
    ``{"k", "v": [B, H_kv, P, D]}`` (post-RoPE keys of the P earlier tokens). Query i sees
    keys j <= P + i (causal over [past | segment]); GQA heads are repeated as transformers
    does. Returns (output [B,T,C] after ``o_proj``, new KV ``{"k", "v": [B, H_kv, P+T, D]}``),
    differentiable, in the activations' dtype. Tested equal to transformers' forward.
    """
    B, T, _ = h.shape
    shape = (B, T, -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if past is not None:
        k = torch.cat([past["k"].to(k.dtype), k], 2)
        v = torch.cat([past["v"].to(v.dtype), v], 2)
    P = k.shape[2] - T                                     # tokens before this segment
    groups = q.shape[1] // k.shape[1]
    mask = None
    if T > 1:                                               # query i sees keys j <= P + i
        j = torch.arange(P + T, device=h.device)
        i = torch.arange(T, device=h.device)
        mask = j[None, :] <= (P + i)[:, None]
    out = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask,
                                         dropout_p=0.0, scale=attn.scaling)
    out = attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
    return out, {"k": k, "v": v}

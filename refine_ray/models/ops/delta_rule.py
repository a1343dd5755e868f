"""Delta rule and gated delta rule in pure PyTorch (chunked WY/UT form and step-by-step form).

Layout follows fla 0.6.0: q, k [B,T,H,K]; v [B,T,H,V]; beta, g [B,T,H]; state [B,H,K,V]
(K first, fla's default ``state_v_first=False``). ``g`` is the per-step log decay (<= 0);
``g=None`` is the plain delta rule. Per head, with a_t = exp(g_t):

    u_t = beta_t (v_t - a_t S_{t-1}^T k_t)
    S_t = a_t S_{t-1} + k_t u_t^T
    o_t = S_t^T (scale * q_t)

Deliberate decisions:
  * All math runs in fp32 (fp64 inputs stay fp64, for gradcheck); ``o`` is cast back to
    ``v.dtype``, the final state stays fp32 (as fla's kernels return it).
  * The chunked form never divides by a cumulative decay: intra-chunk ratios are
    exp(gamma_i - gamma_j) on the lower triangle only, so strong decays underflow to 0
    instead of overflowing.
  * The UT transform (I + A)^-1 is a unit-lower-triangular solve (``solve_triangular``),
    differentiable w.r.t. everything, including ``initial_state``.
  * T need not be a multiple of the chunk size: the tail is padded with beta = 0 and
    g = 0, which leaves the state untouched; padded outputs are dropped.
  * ``keep_states_at`` (positions p, 1 <= p <= T) also returns the state after each p
    tokens: from the state at the start of p's chunk and the first tokens' pseudo-values,
    which the chunk loop computes anyway. Prefix sharing gets its cut states from the
    same pass, differentiably, for O(C·K·V) per position.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .pointwise import l2norm


def _prepare(q, k, v, beta, g, scale, use_qk_l2norm):
    """fp32 (fp64 stays fp64), optional l2norm on q/k, scale folded into q, heads before time: [B,H,T,*]."""
    ct = torch.promote_types(v.dtype, torch.float32)
    q, k, v, beta = q.to(ct), k.to(ct), v.to(ct), beta.to(ct)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q = q * scale
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    beta = beta.transpose(1, 2)
    if g is not None:
        g = g.to(ct).transpose(1, 2)
    return q, k, v, beta, g


def _initial(initial_state, B, H, K, V, ref):
    if initial_state is None:
        return ref.new_zeros(B, H, K, V)
    if tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"initial_state must have shape {(B, H, K, V)}, got {tuple(initial_state.shape)}")
    return initial_state.to(ref.dtype)


def state_positions(positions, T: int, device=None) -> torch.Tensor:
    """``keep_states_at`` as a flat long tensor, checked to lie in [1, T]."""
    pos = torch.as_tensor(positions, dtype=torch.long, device=device).reshape(-1)
    if pos.numel() and (int(pos.min()) < 1 or int(pos.max()) > T):
        raise ValueError(f"keep_states_at must lie in [1, {T}], got {pos.tolist()}")
    return pos


def recurrent_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
    g: Optional[torch.Tensor] = None, scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
    use_qk_l2norm: bool = False,
):
    """Token-by-token recurrence (the reference semantics; O(T) Python steps)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    q, k, v, beta, g = _prepare(q, k, v, beta, g, scale, use_qk_l2norm)
    S = _initial(initial_state, B, H, K, V, q)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, :, t].exp()[..., None, None]
        k_t = k[:, :, t]
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    o = torch.stack(outs, dim=1).to(out_dtype)  # [B,T,H,V]
    return o, (S if output_final_state else None)


def recurrent_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                         use_qk_l2norm=False):
    """Plain delta rule, token by token (``g=None``)."""
    return recurrent_gated_delta_rule(q, k, v, beta, None, scale, initial_state, output_final_state, use_qk_l2norm)


def chunk_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
    g: Optional[torch.Tensor] = None, scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
    use_qk_l2norm: bool = False, chunk_size: int = 64, keep_states_at: Optional[torch.Tensor] = None,
):
    """Chunked (WY / UT-transform) form; equal to :func:`recurrent_gated_delta_rule`.

    With ``keep_states_at`` (P positions in [1, T], any order) it returns a third value, the
    states after that many tokens: [B, P, H, K, V].
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    q, k, v, beta, g = _prepare(q, k, v, beta, g, scale, use_qk_l2norm)
    S = _initial(initial_state, B, H, K, V, q)

    C = max(1, min(chunk_size, T))
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, pad))
        if g is not None:
            g = F.pad(g, (0, pad))
    N = (T + pad) // C
    q, k, v = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v))
    beta = beta.reshape(B, H, N, C)

    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = incl.clone().fill_diagonal_(False)
    if g is not None:
        gam = g.reshape(B, H, N, C).cumsum(-1)                      # log decay from chunk start, inclusive
        decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~incl, float("-inf")).exp()
        k_scaled = k * gam.exp()[..., None]                         # Gamma_i k_i
        q_scaled = q * gam.exp()[..., None]
        to_end = (gam[..., -1:] - gam).exp()                        # Gamma_C / Gamma_j
        chunk_decay = gam[..., -1].exp()                            # Gamma_C
    else:
        decay = incl.to(q.dtype)
        k_scaled, q_scaled, to_end, chunk_decay = k, q, None, None

    # (I + A) [U | W] = [beta v | beta Gamma k],  A_ij = beta_i (Gamma_i/Gamma_j) k_i.k_j for j < i
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).masked_fill(~strict, 0.0)
    L = A + torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * k_scaled], dim=-1)
    sol = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    U, W = sol.split([V, K], dim=-1)
    attn = (q @ k.transpose(-1, -2)) * decay                        # causal, diagonal included

    outs, starts, us = [], [], []
    for n in range(N):
        u = U[:, :, n] - W[:, :, n] @ S                             # true pseudo-values of chunk n
        if keep_states_at is not None:
            starts.append(S)
            us.append(u)
        outs.append(q_scaled[:, :, n] @ S + attn[:, :, n] @ u)
        if g is None:
            S = S + k[:, :, n].transpose(-1, -2) @ u
        else:
            k_end = k[:, :, n] * to_end[:, :, n, :, None]
            S = S * chunk_decay[:, :, n, None, None] + k_end.transpose(-1, -2) @ u
    o = torch.cat(outs, dim=2)[:, :, :T].transpose(1, 2).to(out_dtype)  # [B,T,H,V]
    final = S if output_final_state else None
    if keep_states_at is None:
        return o, final
    pos = state_positions(keep_states_at, T, q.device)
    # State after p tokens = state at the start of p's chunk n, advanced by its first j tokens:
    # S_p = Gamma_j S_n + sum_{i<j} (Gamma_j / Gamma_i) k_i u_i^T   (Gamma = 1 without decay).
    n_of, j_of = torch.div(pos - 1, C, rounding_mode="floor"), (pos - 1) % C + 1
    first_j = torch.arange(C, device=q.device)[None, :] < j_of[:, None]           # [P, C]
    chunks = n_of.tolist()                                                        # stack only what is read
    S0 = (torch.stack([starts[n] for n in chunks], 2) if chunks
          else S.new_zeros(B, H, 0, K, V))                                        # [B,H,P,K,V]
    u_p = torch.stack([us[n] for n in chunks], 2) if chunks else S.new_zeros(B, H, 0, C, V)  # [B,H,P,C,V]
    k_p = k[:, :, n_of]                                                           # [B,H,P,C,K]
    if g is None:
        weight = first_j.to(k_p.dtype)[..., None]
    else:
        gam_p = gam[:, :, n_of]                                                   # [B,H,P,C]
        gam_j = gam_p.gather(-1, (j_of - 1).expand(B, H, -1)[..., None])          # [B,H,P,1]
        weight = (gam_j - gam_p).masked_fill(~first_j, float("-inf")).exp()[..., None]
        S0 = S0 * gam_j.exp()[..., None]
    kept = S0 + (k_p * weight).transpose(-1, -2) @ u_p                           # [B,H,P,K,V]
    return o, final, kept.transpose(1, 2)


def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm=False, chunk_size=64, keep_states_at=None):
    """Plain delta rule, chunked (``g=None``)."""
    return chunk_gated_delta_rule(q, k, v, beta, None, scale, initial_state, output_final_state,
                                  use_qk_l2norm, chunk_size, keep_states_at)

"""Pure math of LaCT's SwiGLU fast weights: apply, closed-form update, chunked scan (the LaCT op).

Source: Zhang et al. 2025, "Test-Time Training Done Right" (LaCT) and its released code.

Shapes (``N`` = batch x fast-weight heads, flattened; ``d`` = head dim, ``h`` = hidden):
  w0, w2: [N, h, d]    w1: [N, d, h]    f_W(x) = W1 (silu(W0 x) * (W2 x))
  q, k, v: [N, T, d]   lr: [N, T, 3] (one rate for W0, W1, W2)   gate: [N, T] or None

Update of one chunk (k, v, lr over its tokens), written out by hand, no autograd::

    dW_j = - d/dW_j  sum_t  -lr_{j,t} <f_W(k_t), v_t>        (one gradient-descent step)
    dW  += m * dW_prev   (m = chunk mean of the sigmoid momentum gate; dW_prev = last dW)
    W   += dW;  each row of W is rescaled to the norm its row had in the *initial* W.

Everything here runs in float32 (upstream LaCT keeps "fp32 states" too); callers
upcast. All functions are differentiable w.r.t. every input, so gradients flow
through carried states into earlier segments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROW_NORM_EPS = 1e-5  # as upstream LaCT: W / (||W_row|| + eps) * ||W0_row||


def swiglu_apply(w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f_W(x) for x [N, T, d] -> [N, T, d_out]."""
    gate = F.silu(x @ w0.transpose(1, 2))
    hidden = x @ w2.transpose(1, 2)
    return (gate * hidden) @ w1.transpose(1, 2)


def silu_derivative(x: torch.Tensor) -> torch.Tensor:
    """d silu(x) / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x))), elementwise."""
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def swiglu_update(w0, w1, w2, k, v, lr):
    """Closed-form descent step on L = -sum_t lr_t <f_W(k_t), v_t> (per-matrix lr).

    Returns (dW0, dW1, dW2) with the shapes of (w0, w1, w2); dW = -lr * dL/dW.
    """
    g = k @ w0.transpose(1, 2)            # [N, T, h] pre-activation of the gate
    u = k @ w2.transpose(1, 2)            # [N, T, h] linear branch
    sg = F.silu(g)
    dh = v @ w1                           # [N, T, h] = W1^T v per token
    lr0, lr1, lr2 = lr.unbind(-1)         # [N, T] each
    dw1 = v.transpose(1, 2) @ (sg * u * lr1.unsqueeze(-1))                    # [N, d, h]
    dw2 = (dh * sg).transpose(1, 2) @ (k * lr2.unsqueeze(-1))                 # [N, h, d]
    dw0 = (dh * u * silu_derivative(g)).transpose(1, 2) @ (k * lr0.unsqueeze(-1))
    return dw0, dw1, dw2


def renorm_rows(w: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    """Rescale each row (last dim) of w to ``target_norm`` ([.., rows, 1])."""
    return w / (w.norm(dim=-1, keepdim=True) + ROW_NORM_EPS) * target_norm


def chunk_update(ws, moms, k, v, lr, gate, norms):
    """One chunk's update: closed-form step, optional momentum, row renorm.

    ws / moms / norms: 3-tuples for (W0, W1, W2); moms is None without momentum.
    Returns (new_ws, new_moms).
    """
    dws = swiglu_update(*ws, k, v, lr)
    if moms is not None:
        m = gate.mean(dim=1).view(-1, 1, 1)                       # [N, 1, 1]
        dws = tuple(dw + m * prev for dw, prev in zip(dws, moms))
        moms = dws
    ws = tuple(renorm_rows(w + dw, n) for w, dw, n in zip(ws, dws, norms))
    return ws, moms


def fast_weight_scan(q, k, v, lr, gate, state: dict, norms, chunk_size: int,
                     final_update: bool = True):
    """Apply-then-update over a stream of tokens continuing ``state``.

    state: dict with w0, w1, w2 [N, ...]; optional m0, m1, m2 (momentum buffers);
      pk, pv [N, P, d], plr [N, P, 3], pgate [N, P] — the pending tokens of the
      current, incomplete chunk (P = tokens already consumed since its start).
    Every token reads the weights after the last *completed* chunk. A chunk that
    completes updates W; ``final_update=False`` skips the update of a chunk that
    completes exactly at the end (nothing reads it; only used when the caller
    discards the state). Returns (out [N, T, d_out], new_state).
    """
    ws = (state["w0"], state["w1"], state["w2"])
    moms = (state["m0"], state["m1"], state["m2"]) if "m0" in state else None
    pk, pv, plr = state["pk"], state["pv"], state["plr"]
    pgate = state.get("pgate")
    T = q.shape[1]
    outs = []
    pos = 0
    while pos < T:
        P = pk.shape[1]
        n = min(chunk_size - P, T - pos)
        sl = slice(pos, pos + n)
        outs.append(swiglu_apply(*ws, q[:, sl]))
        pk = torch.cat([pk, k[:, sl]], 1)
        pv = torch.cat([pv, v[:, sl]], 1)
        plr = torch.cat([plr, lr[:, sl]], 1)
        if pgate is not None:
            pgate = torch.cat([pgate, gate[:, sl]], 1)
        pos += n
        if P + n == chunk_size and (pos < T or final_update):
            ws, moms = chunk_update(ws, moms, pk, pv, plr, pgate, norms)
            # fresh empties, not [:, :0] views that would pin the chunk's storage
            pk, pv, plr = (t.new_zeros(t.shape[0], 0, *t.shape[2:]) for t in (pk, pv, plr))
            if pgate is not None:
                pgate = pgate.new_zeros(pgate.shape[0], 0)
    out = torch.cat(outs, 1) if outs else q.new_zeros(q.shape[0], 0, ws[1].shape[1])
    new_state = {"w0": ws[0], "w1": ws[1], "w2": ws[2], "pk": pk, "pv": pv, "plr": plr}
    if moms is not None:
        new_state.update(m0=moms[0], m1=moms[1], m2=moms[2])
    if pgate is not None:
        new_state["pgate"] = pgate
    return out, new_state


def init_scan_state(w0, w1, w2, batch: int, d_in: int, d_out: int, momentum: bool) -> dict:
    """Empty state for ``batch`` rows from the initial weights [H, ...] -> [batch*H, ...]."""
    ws = [w.float().repeat(batch, 1, 1) for w in (w0, w1, w2)]
    N = ws[0].shape[0]
    dev = ws[0].device
    st = {"w0": ws[0], "w1": ws[1], "w2": ws[2],
          "pk": torch.zeros(N, 0, d_in, device=dev), "pv": torch.zeros(N, 0, d_out, device=dev),
          "plr": torch.zeros(N, 0, 3, device=dev)}
    if momentum:
        st.update(m0=torch.zeros_like(ws[0]), m1=torch.zeros_like(ws[1]), m2=torch.zeros_like(ws[2]),
                  pgate=torch.zeros(N, 0, device=dev))
    return st


def initial_row_norms(w0, w1, w2, batch: int):
    """Row norms of the initial weights, repeated to [batch*H, rows, 1]."""
    return tuple(w.float().norm(dim=-1, keepdim=True).repeat(batch, 1, 1) for w in (w0, w1, w2))

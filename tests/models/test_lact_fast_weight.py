"""The pure fast-weight math of LaCT: closed-form update, momentum, row renorm, chunked scan."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from refine_ray.models.ops.fast_weight import (
    chunk_update,
    fast_weight_scan,
    renorm_rows,
    swiglu_apply,
    swiglu_update,
)

torch.set_num_threads(1)
D = torch.float64


def _f(w0, w1, w2, x):  # independent spelling of f_W(x) = W1 (silu(W0 x) * (W2 x)), x [T, d]
    return torch.einsum("oh,th->to", w1, F.silu(torch.einsum("hd,td->th", w0, x)) * torch.einsum("hd,td->th", w2, x))


def test_update_scalar_case_by_hand():
    # d = h = 1: f = w1 * silu(w0 k) * (w2 k); w0=1, w1=2, w2=3, k=v=1, all lr=1.
    w0, w1, w2 = (torch.tensor([[[x]]], dtype=D) for x in (1.0, 2.0, 3.0))
    k = v = torch.ones(1, 1, 1, dtype=D)
    lr = torch.ones(1, 1, 3, dtype=D)
    dw0, dw1, dw2 = swiglu_update(w0, w1, w2, k, v, lr)
    sig = 1 / (1 + math.exp(-1.0))
    silu1, dsilu1 = sig, sig * (1 + (1 - sig))
    assert math.isclose(dw1.item(), silu1 * 3, rel_tol=1e-12)          # v * silu(w0 k) * (w2 k)
    assert math.isclose(dw2.item(), 2 * silu1 * 1, rel_tol=1e-12)      # v * w1 * silu(w0 k) * k
    assert math.isclose(dw0.item(), 2 * 3 * dsilu1 * 1, rel_tol=1e-12)  # v * w1 * (w2 k) * silu'(w0 k) * k


def test_update_equals_autograd_descent_step():
    torch.manual_seed(0)
    N, T, d, h = 2, 5, 3, 4
    w0, w2 = torch.randn(N, h, d, dtype=D), torch.randn(N, h, d, dtype=D)
    w1 = torch.randn(N, d, h, dtype=D)
    k, v = torch.randn(N, T, d, dtype=D), torch.randn(N, T, d, dtype=D)
    lr = torch.rand(N, T, 3, dtype=D)
    closed = swiglu_update(w0, w1, w2, k, v, lr)
    for n in range(N):
        for j in range(3):  # lr_j weights only the loss whose gradient updates W_j
            ws = [w.detach()[n].clone().requires_grad_(True) for w in (w0, w1, w2)]
            loss = -(lr[n, :, j] * (_f(*ws, k[n]) * v[n]).sum(-1)).sum()
            grad = torch.autograd.grad(loss, ws[j])[0]
            torch.testing.assert_close(closed[j][n], -grad, rtol=1e-12, atol=1e-12)


def test_renorm_keeps_initial_row_norms():
    torch.manual_seed(1)
    w_init = torch.randn(3, 6, 5, dtype=D)
    target = w_init.norm(dim=-1, keepdim=True)
    w = renorm_rows(w_init + 2.0 * torch.randn_like(w_init), target)
    torch.testing.assert_close(w.norm(dim=-1, keepdim=True), target, rtol=1e-4, atol=0)
    # chunk_update renormalises all three matrices to the norms it is given
    N, T, d, h = 3, 7, 5, 6
    ws = (w_init, torch.randn(N, d, h, dtype=D), torch.randn(N, h, d, dtype=D))
    norms = tuple(w.norm(dim=-1, keepdim=True) for w in ws)
    new, _ = chunk_update(ws, None, torch.randn(N, T, d, dtype=D), torch.randn(N, T, d, dtype=D),
                          torch.rand(N, T, 3, dtype=D), None, norms)
    for w, n in zip(new, norms):
        torch.testing.assert_close(w.norm(dim=-1, keepdim=True), n, rtol=1e-4, atol=0)
    assert not torch.allclose(new[0], ws[0])


def _reference_scan(w0, w1, w2, q, k, v, lr, gate, C):
    """Upstream's full-sequence loop, with autograd for the update: chunks that are
    followed by more tokens update W; the last (possibly full) chunk only reads."""
    norms = [w.norm(dim=-1, keepdim=True) for w in (w0, w1, w2)]
    ws = [w0, w1, w2]
    prev = None
    T = q.shape[1]
    out = []
    for s in range(0, T, C):
        e = min(T, s + C)
        out.append(torch.stack([_f(*(w[n] for w in ws), q[n, s:e]) for n in range(q.shape[0])]))
        if e == T:
            break
        dws = []
        for j in range(3):
            leaf = [w.detach().clone().requires_grad_(True) for w in ws]
            loss = -sum((lr[n, s:e, j] * (_f(*(w[n] for w in leaf), k[n, s:e]) * v[n, s:e]).sum(-1)).sum()
                        for n in range(q.shape[0]))
            dws.append(-torch.autograd.grad(loss, leaf[j])[0])
        if gate is not None:
            m = gate[:, s:e].mean(1).view(-1, 1, 1)
            if prev is not None:
                dws = [dw + m * p for dw, p in zip(dws, prev)]
            prev = dws
        ws = [w + dw for w, dw in zip(ws, dws)]
        ws = [w / (w.norm(dim=-1, keepdim=True) + 1e-5) * n for w, n in zip(ws, norms)]
    return torch.cat(out, 1)


def _empty(w0, w1, w2, d, momentum):
    N = w0.shape[0]
    st = {"w0": w0, "w1": w1, "w2": w2, "pk": torch.zeros(N, 0, d, dtype=D),
          "pv": torch.zeros(N, 0, d, dtype=D), "plr": torch.zeros(N, 0, 3, dtype=D)}
    if momentum:
        st.update(m0=torch.zeros_like(w0), m1=torch.zeros_like(w1), m2=torch.zeros_like(w2),
                  pgate=torch.zeros(N, 0, dtype=D))
    return st


def test_scan_matches_reference_loop_and_any_split():
    torch.manual_seed(2)
    N, T, d, h, C = 2, 23, 4, 5, 6
    w0, w2 = torch.randn(N, h, d, dtype=D), torch.randn(N, h, d, dtype=D)
    w1 = torch.randn(N, d, h, dtype=D)
    q, k, v = (F.normalize(torch.randn(N, T, d, dtype=D), dim=-1) for _ in range(3))
    lr = 0.5 * torch.rand(N, T, 3, dtype=D)
    gate = torch.rand(N, T, dtype=D)
    norms = tuple(w.norm(dim=-1, keepdim=True) for w in (w0, w1, w2))
    for g in (None, gate):
        ref = _reference_scan(w0, w1, w2, q, k, v, lr, g, C)
        out, _ = fast_weight_scan(q, k, v, lr, g, _empty(w0, w1, w2, d, g is not None), norms, C,
                                  final_update=False)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        # the first chunk reads the initial weights; later chunks read updated ones
        torch.testing.assert_close(out[:, :C], swiglu_apply(w0, w1, w2, q[:, :C]))
        assert (out[:, C:] - swiglu_apply(w0, w1, w2, q[:, C:])).abs().max() > 1e-3
        for cuts in ([6], [5, 7, 12], [1, 2, 3, 18, 22], list(range(1, T))):
            st = _empty(w0, w1, w2, d, g is not None)
            outs, prev = [], 0
            for c in cuts + [T]:
                sl = slice(prev, c)
                o, st = fast_weight_scan(q[:, sl], k[:, sl], v[:, sl], lr[:, sl],
                                         None if g is None else g[:, sl], st, norms, C)
                outs.append(o)
                prev = c
            torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-10, atol=1e-10)
            assert st["pk"].shape[1] == T % C

"""Pure-PyTorch ops vs fla 0.6.0's pure-torch references and vs our step-by-step recurrence.

Tolerances (fp32 unless stated): outputs and gradients within 2e-5 absolute (measured
~1e-6 or below); fp64 gradcheck uses torch's defaults.
"""
import pytest
import torch
import torch.nn.functional as F
from fla.modules.norm.layernorm import rms_norm_ref
from fla.modules.norm.layernorm_gated import rms_norm_ref as gated_rms_norm_ref
from fla.ops.delta_rule.naive import delta_rule_recurrence
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

from refine_ray.models.ops import (causal_conv1d, chunk_delta_rule, chunk_gated_delta_rule, kernel_backend, l2norm,
                                   recurrent_delta_rule, recurrent_gated_delta_rule, rms_norm, rms_norm_gated, swiglu)

ATOL = 2e-5


def _inputs(B=2, T=37, H=2, K=8, V=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    logdecay = -3 * torch.rand(B, T, H, generator=g, dtype=dtype)
    h0 = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, beta, logdecay, h0)]


def _grads(out, ht, tensors, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g)).sum() + (ht * torch.randn(ht.shape, generator=g)).sum()
    return torch.autograd.grad(loss, tensors)


def _close(a, b, atol=ATOL):
    assert (a.float() - b.float()).abs().max().item() <= atol, (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("T,chunk", [(37, 16), (64, 64), (5, 64), (1, 16)])
def test_delta_rule_chunk_vs_recurrent_vs_fla_naive(T, chunk):
    q, k, v, beta, _, h0 = _inputs(T=T)
    o1, s1 = chunk_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True,
                              chunk_size=chunk)
    o2, s2 = recurrent_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    # fla's naive reference is head-first [B,H,T,*] and does not l2-normalise itself.
    tr = lambda x: x.transpose(1, 2)  # noqa: E731
    o3, s3 = delta_rule_recurrence(tr(l2norm(q)), tr(l2norm(k)), tr(v), tr(beta), initial_state=h0)
    o3 = tr(o3)
    for o, s in ((o2, s2), (o3, s3)):
        _close(o1, o)
        _close(s1, s)
    ins = (q, k, v, beta, h0)
    for ga, gb, gc in zip(_grads(o1, s1, ins), _grads(o2, s2, ins), _grads(o3, s3, ins)):
        _close(ga, gb)
        _close(ga, gc)


@pytest.mark.parametrize("T,chunk", [(37, 16), (64, 32), (3, 64)])
def test_gated_delta_rule_chunk_vs_recurrent_vs_fla_naive(T, chunk):
    q, k, v, beta, g, h0 = _inputs(T=T)
    o1, s1 = chunk_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True, use_qk_l2norm=True,
                                    chunk_size=chunk)
    o2, s2 = recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True,
                                        use_qk_l2norm=True)
    o3, s3 = naive_recurrent_gated_delta_rule(l2norm(q), l2norm(k), v, beta, g, initial_state=h0,
                                              output_final_state=True)
    for o, s in ((o2, s2), (o3, s3)):
        _close(o1, o)
        _close(s1, s)
    ins = (q, k, v, beta, g, h0)
    for ga, gb, gc in zip(_grads(o1, s1, ins), _grads(o2, s2, ins), _grads(o3, s3, ins)):
        _close(ga, gb)
        _close(ga, gc)


def test_gated_delta_rule_strong_decay_is_finite():
    """Cumulative decays of e^-500 inside a chunk must underflow to 0, not produce inf/nan."""
    q, k, v, beta, _, h0 = _inputs(T=40)
    g = torch.full(beta.shape, -25.0, requires_grad=True)
    o1, s1 = chunk_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True, chunk_size=32)
    o2, s2 = recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    _close(o1, o2)
    _close(s1, s2)
    grads = _grads(o1, s1, (q, k, v, beta, g, h0))
    assert all(torch.isfinite(x).all() for x in grads)


def test_chunked_segments_carry_state():
    """Two chunked calls with the carried state == one call (outputs and final state)."""
    q, k, v, beta, g, h0 = _inputs(T=50)
    o, s = chunk_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True, chunk_size=16)
    oa, sa = chunk_gated_delta_rule(q[:, :21], k[:, :21], v[:, :21], beta[:, :21], g[:, :21], initial_state=h0,
                                    output_final_state=True, chunk_size=16)
    ob, sb = chunk_gated_delta_rule(q[:, 21:], k[:, 21:], v[:, 21:], beta[:, 21:], g[:, 21:], initial_state=sa,
                                    output_final_state=True, chunk_size=16)
    _close(torch.cat([oa, ob], 1), o)
    _close(sb, s)


def test_gradcheck_fp64():
    q, k, v, beta, g, h0 = (x.detach().double().requires_grad_() for x in _inputs(B=1, T=7, H=1, K=3, V=2))
    fn = lambda *a: chunk_gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True,  # noqa: E731
                                           use_qk_l2norm=True, chunk_size=4)
    assert torch.autograd.gradcheck(fn, (q, k, v, beta, g, h0))


@pytest.mark.parametrize("T", [11, 40])   # short segments use a windowed sum, longer ones F.conv1d
def test_causal_conv1d_matches_conv_and_carries_cache(T):
    gen = torch.Generator().manual_seed(0)
    B, D, W = 2, 5, 4
    x = torch.randn(B, T, D, generator=gen, requires_grad=True)
    w = torch.randn(D, 1, W, generator=gen, requires_grad=True)
    b = torch.randn(D, generator=gen)
    ref = F.silu(F.conv1d(x.transpose(1, 2), w, b, padding=W - 1, groups=D)[..., :T]).transpose(1, 2)
    y, cache = causal_conv1d(x, w, b, activation="silu")
    _close(y, ref, 1e-6)
    _close(cache, x[:, -(W - 1):].transpose(1, 2), 0)
    # segments of length 2 (< W-1), 1 and the rest with carried caches == one pass, gradients included
    outs, c = [], None
    for lo, hi in ((0, 2), (2, 3), (3, T)):
        yi, c = causal_conv1d(x[:, lo:hi], w, b, cache=c, activation="silu")
        outs.append(yi)
    _close(torch.cat(outs, 1), y, 1e-6)
    gx1, gw1 = torch.autograd.grad(y.square().sum(), (x, w))
    gx2, gw2 = torch.autograd.grad(torch.cat(outs, 1).square().sum(), (x, w))
    _close(gx1, gx2, 1e-5)
    _close(gw1, gw2, 1e-5)


def test_causal_conv1d_cache_is_differentiable():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, generator=gen)
    w = torch.randn(4, 3, generator=gen)
    cache = torch.randn(1, 4, 2, generator=gen, requires_grad=True)
    y, _ = causal_conv1d(x, w, cache=cache)
    (gc,) = torch.autograd.grad(y.sum(), cache)
    assert gc.abs().sum() > 0


def test_pointwise_ops_match_fla_references():
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(3, 7, 16, generator=gen), torch.randn(3, 7, 16, generator=gen)
    w = torch.randn(16, generator=gen)
    _close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, None, eps=1e-5), 1e-6)
    _close(rms_norm_gated(x, z, w, 1e-5, "swish"), gated_rms_norm_ref(x, w, None, z=z, eps=1e-5), 1e-6)
    _close(rms_norm_gated(x, z, w, 1e-5, "sigmoid"), rms_norm_ref(x, w, None, eps=1e-5) * torch.sigmoid(z), 1e-6)
    _close(swiglu(x, z), F.silu(x) * z, 1e-6)
    _close(l2norm(x), x / torch.sqrt(x.square().sum(-1, keepdim=True) + 1e-6), 1e-6)
    assert l2norm(torch.zeros(2, 4)).abs().sum() == 0  # eps keeps zero vectors finite


def test_kernel_backend_on_cpu(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("REFINE_KERNELS", raising=False)
    assert kernel_backend(x) == "torch"
    monkeypatch.setenv("REFINE_KERNELS", "fla")
    with pytest.raises(RuntimeError, match="CUDA"):
        kernel_backend(x)
    monkeypatch.setenv("REFINE_KERNELS", "bogus")
    with pytest.raises(ValueError, match="REFINE_KERNELS"):
        kernel_backend(x)

"""Run-time kernel selection: fla's Triton kernels on CUDA, our PyTorch ops elsewhere.

``REFINE_KERNELS`` = ``auto`` (default: fla iff the tensor is on CUDA and fla's kernels
import), ``torch`` (always ours) or ``fla`` (always fla; error off CUDA).
fla's kernel modules are imported lazily, only when the fla backend is chosen, so a CPU
run never imports or needs a Triton kernel.

Deliberate decisions for the fla backend:
  * The GatedDeltaNet gate (-exp(A_log) * softplus(a + dt_bias)) and beta = sigmoid(b)
    are computed in PyTorch and passed in log / post-sigmoid space: same math as fla's
    in-kernel variants, one code path for both backends.
  * Fused-recurrent kernels serve short segments (T <= 64) only when no gradient is
    needed, as fla's layers do at inference; everything else uses the chunk kernels,
    except fp32 DeltaNet: fla 0.6.0's chunk_delta_rule rejects fp32, so fp32 uses the
    fused-recurrent kernel (with its backward) at any length.
  * States are fp32 in [B,H,K,V] layout on both backends, so a state produced by one
    backend can be consumed by the other.
  * Kept states (states at given positions, for prefix sharing) come from our chunk loop
    almost for free; fla's public kernels do not return their chunk states, so there the
    segment runs in slices between the positions (one more kernel launch per position and
    layer, no extra FLOPs).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from . import conv as _conv
from . import delta_rule as _dr
from . import pointwise as _pw

_MODES = ("auto", "torch", "fla")


@functools.lru_cache(maxsize=1)
def fla_kernels_available() -> bool:
    """Whether fla's delta-rule Triton kernels import here (cached; False on a machine without Triton)."""
    try:
        import fla.ops.delta_rule  # noqa: F401
        import fla.ops.gated_delta_rule  # noqa: F401
        return True
    except Exception:  # pragma: no cover - depends on the install
        return False


def kernel_backend(x: torch.Tensor) -> str:
    """'fla' or 'torch' for an op on tensor ``x``, honouring REFINE_KERNELS."""
    mode = os.environ.get("REFINE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"REFINE_KERNELS must be one of {_MODES}, got {mode!r}")
    if mode == "torch":
        return "torch"
    if mode == "fla":
        if not x.is_cuda:
            raise RuntimeError("REFINE_KERNELS=fla needs CUDA tensors: fla's kernels are Triton-only")
        if not fla_kernels_available():
            raise RuntimeError("REFINE_KERNELS=fla but fla's kernels (fla.ops) do not import")
        return "fla"
    return "fla" if (x.is_cuda and fla_kernels_available()) else "torch"


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _by_slices(run, T: int, positions, initial_state):
    """Kept states by running the op on the slices between the positions, carrying the state:
    for backends whose kernels do not expose their chunk states (fla)."""
    pos = _dr.state_positions(positions, T, "cpu")
    bounds = sorted(set(pos.tolist()))
    outs, at, state, start = [], {}, initial_state, 0
    for end in bounds + ([T] if not bounds or bounds[-1] < T else []):
        o, state, _ = run(slice(start, end), state)
        outs.append(o)
        at[end] = state
        start = end
    kept = [at[p] for p in pos.tolist()]
    stacked = torch.stack(kept, 1) if kept else state.new_zeros(state.shape[0], 0, *state.shape[1:])
    return torch.cat(outs, 1), state, stacked


def delta_rule(q, k, v, beta, initial_state: Optional[torch.Tensor] = None, use_qk_l2norm: bool = True,
               scale: Optional[float] = None, keep_states_at=None):
    """DeltaNet rule; returns (o [B,T,H,V], final_state [B,H,K,V] fp32, kept).

    kept: None, or for ``keep_states_at`` (P positions in [1, T]) the states after that many
    tokens of the segment: [B, P, H, K, V] fp32.
    """
    T = q.shape[1]
    backend = kernel_backend(q)
    if keep_states_at is not None and backend == "fla":
        return _by_slices(lambda sl, h0: delta_rule(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], h0,
                                                    use_qk_l2norm, scale), T, keep_states_at, initial_state)
    if backend == "fla":
        from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
        fn = chunk_delta_rule
        # fla 0.6.0's chunk_delta_rule asserts q is not fp32; its fused-recurrent kernel
        # (forward and backward, incl. initial/final-state grads) takes fp32.
        if q.dtype == torch.float32 or (T <= 64 and not _needs_grad(q, k, v, beta, initial_state)):
            fn = fused_recurrent_delta_rule
        o, final = fn(q=q, k=k, v=v, beta=beta, scale=scale,
                      initial_state=None if initial_state is None else initial_state.float(),
                      output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm)
        return o, final, None
    if keep_states_at is not None:
        return _dr.chunk_delta_rule(q, k, v, beta, scale=scale, initial_state=initial_state, output_final_state=True,
                                    use_qk_l2norm=use_qk_l2norm, keep_states_at=keep_states_at)
    fn = _dr.recurrent_delta_rule if T == 1 else _dr.chunk_delta_rule
    o, final = fn(q, k, v, beta, scale=scale, initial_state=initial_state, output_final_state=True,
                  use_qk_l2norm=use_qk_l2norm)
    return o, final, None


def gated_delta_rule(q, k, v, g, beta, initial_state: Optional[torch.Tensor] = None,
                     use_qk_l2norm: bool = True, scale: Optional[float] = None, keep_states_at=None):
    """Gated delta rule with log decay g [B,T,HV]; q/k may have H heads dividing HV (value head hv
    reads q/k head hv // (HV // H), as fla's kernels do). Returns (o, final_state fp32, kept)
    as :func:`delta_rule`."""
    T = q.shape[1]
    backend = kernel_backend(q)
    if keep_states_at is not None and backend == "fla":
        return _by_slices(lambda sl, h0: gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], h0,
                                                          use_qk_l2norm, scale), T, keep_states_at, initial_state)
    if backend == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        h0 = None if initial_state is None else initial_state.float()
        fn = chunk_gated_delta_rule
        if T <= 64 and not _needs_grad(q, k, v, g, beta, initial_state):
            fn = fused_recurrent_gated_delta_rule
        o, final = fn(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=h0,
                      output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm)
        return o, final, None
    H, HV = q.shape[2], v.shape[2]
    if HV != H:
        q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
    if keep_states_at is not None:
        return _dr.chunk_gated_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                          output_final_state=True, use_qk_l2norm=use_qk_l2norm,
                                          keep_states_at=keep_states_at)
    fn = _dr.recurrent_gated_delta_rule if T == 1 else _dr.chunk_gated_delta_rule
    o, final = fn(q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=True,
                  use_qk_l2norm=use_qk_l2norm)
    return o, final, None


def short_conv(x, weight, bias=None, cache: Optional[torch.Tensor] = None, activation: Optional[str] = None):
    """Causal depthwise conv; returns (y [B,T,D], new cache [B,D,W-1]). The new cache is always
    computed in PyTorch (a slice), so it is differentiable on both backends."""
    if kernel_backend(x) == "fla":
        from fla.modules.causal_conv1d import causal_conv1d
        B, T, D = x.shape
        W = weight.shape[-1]
        h0 = None if cache is None else torch.cat([cache.new_zeros(B, D, 1), cache.to(x.dtype)], -1)
        y, _ = causal_conv1d(x=x, weight=weight.reshape(D, W), bias=bias, initial_state=h0,
                             output_final_state=False, activation=activation)
        prev = x.new_zeros(B, D, W - 1) if cache is None else cache.to(x.dtype)
        hist = torch.cat([prev, x.transpose(1, 2)], dim=-1)
        return y, hist[..., hist.shape[-1] - (W - 1):]
    return _conv.causal_conv1d(x, weight, bias, cache, activation)


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last dim (fla.modules RMSNorm's kernel or ``pointwise.rms_norm``); x's dtype."""
    if kernel_backend(x) == "fla":
        from fla.modules.norm.layernorm import rms_norm as fla_rms_norm
        return fla_rms_norm(x, weight, None, eps=eps)
    return _pw.rms_norm(x, weight, eps)


def rms_norm_gated(x, g, weight, eps: float, activation: str = "swish"):
    """rms_norm(x) * weight * act(g) (fla's FusedRMSNormGated kernel or ``pointwise.rms_norm_gated``)."""
    if kernel_backend(x) == "fla":
        from fla.modules.norm.fused_norm_gate import rms_norm_gated as fla_rms_norm_gated
        return fla_rms_norm_gated(x, g, weight, None, activation=activation, eps=eps)
    return _pw.rms_norm_gated(x, g, weight, eps, activation)


def swiglu(gate, up):
    """silu(gate) * up in fp32, returned in gate's dtype (fla's fused kernel or ``pointwise.swiglu``)."""
    if kernel_backend(gate) == "fla":
        from fla.modules.activations import swiglu as fla_swiglu
        return fla_swiglu(gate, up)
    return _pw.swiglu(gate, up)

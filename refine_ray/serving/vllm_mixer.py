"""fla's DeltaNet / GatedDeltaNet token mixer as vLLM's gated-delta-rule layer (vLLM 0.32 internals).

The layer subclasses ``OlmoHybridGatedDeltaNetAttention``
(vllm/model_executor/layers/mamba/gdn/olmo_gdn_linear_attn.py), vLLM's GatedDeltaNet layer for
fla's checkpoint layout, and inherits from it:
  * ``forward``: the whole mixer is vLLM's own opaque custom op
    ``vllm::olmo_hybrid_gdn_full_forward``, one of the ops vLLM splits its compiled graph at
    (``CompilationConfig._attention_ops``) and breaks breakable CUDA graphs at, so piecewise
    graphs run it eagerly and FULL graphs (uniform decode batches) capture only its kernels;
  * ``_forward_core``, the CUDA core: vLLM's Triton ``causal_conv1d_fn`` / ``_update``, its
    gating kernel (g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), x2 with
    allow_neg_eigval), ``chunk_gated_delta_rule`` (prefill) and
    ``fused_recurrent_gated_delta_rule`` (decode), with q/k l2-normalised in the kernels
    (eps 1e-6, fla's), over vLLM's state slots (null slot 0 skipped: FULL-graph padding);
  * ``get_state_shape``, ``rearrange_mixed_qkv``; the state cache, ``GDNAttentionMetadata``,
    prefix caching (``mamba_cache_mode='align'``) and state copies are vLLM's.
Ours: the construction (OLMo's ``__init__`` asserts an output gate and reads OLMo's config
names, so this one calls the GDN base initialiser and builds the same vLLM parallel layers from
fla's options), ``_full_forward`` (projections, fla's variants mapped onto the gated rule,
output norm) and the CPU cores.

fla's variants on vLLM's gated rule (fla 0.6.0 fla/layers/{delta_net,gated_deltanet}.py):
  * DeltaNet has no decay: A_log = -inf, a = dt_bias = 0, so g = -exp(-inf) softplus(0) = -0.
  * ``use_beta=False`` (DeltaNet): b = +inf, so beta = sigmoid(b) = 1 (2 with allow_neg_eigval).
  * ``use_short_conv=False``: fla applies silu to q, k, v. vLLM's CUDA core always convolves,
    so its conv weight is then the identity kernel [0, .., 0, 1] (x * 1 + 0 is exact) followed
    by the same silu; the PyTorch core applies silu directly.
  * Output: per-head RMSNorm (vLLM's ``RMSNormGated``, norm before gate, gated by act(x W_g)
    with ``use_gate``, act = GatedDeltaNet's ``output_gate_activation`` (swish by default) or
    swish for DeltaNet; the gate-free o_norm weight in fp32 as fla keeps it), o_proj.

Cores, chosen once per layer when it is built (:func:`select_core`) and logged once:
  * ``cuda`` (CUDA platform): vLLM's Triton kernels above. vLLM's chunk kernel refuses fp32,
    so in fp32 a batch with prefills runs the ``torch`` core over the same state memory
    (decode-only batches, the ones FULL CUDA graphs capture, stay on vLLM's kernels).
  * ``cpu_kernel`` (CPU, bf16, key head dim = value head dim in {64, 128}, no
    allow_neg_eigval): vLLM's C++ kernels ``chunk_gated_delta_rule_cpu`` (prefill) and
    ``fused_sigmoid_gating_delta_rule_update_cpu`` (decode), q/k normalised here with eps 1e-6.
  * ``torch`` (CPU otherwise, e.g. fp32): refine_ray.models.ops, the reference. Decode is one
    batched recurrence step over the decoding sequences (gather by slot, step, scatter);
    prefill the chunked form per sequence, as vLLM's CPU path loops.
State layout: vLLM allocates [slots, HV, V, K]. Its Triton kernels address it as [V, K], so on
CUDA the torch core reads it through a transposed view; its CPU kernels address the memory as
[K, V] (refine_ray's layout), so on CPU the torch core views it as [K, V]. A state is therefore
not portable between the CPU and CUDA builds.

Tensor parallelism: heads are split across ranks as vLLM's GDN layers split them (q/k/v/g
rows per head by ``MergedColumnParallelLinear``, b/a rows and A_log/dt_bias per value head,
conv channels by the same rows, o_proj by its input columns with ``RowParallelLinear``);
num_heads and num_v_heads must divide by the TP size (one-line ValueError otherwise).
Refused on CUDA (one line): ``conv_size`` outside 2..4 (vLLM's prefill conv kernel's widths).
No speculative decoding. fla's models build their short convs without bias whatever the config
says, and so does this layer.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.layernorm import RMSNormGated
from vllm.model_executor.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.mamba.gdn.base import GatedDeltaNetAttention
from vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn import (OlmoHybridGatedDeltaNetAttention,
                                                                       _make_fused_conv1d_weight_loader)
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
from vllm.model_executor.model_loader.weight_utils import sharded_weight_loader
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from refine_ray.models.ops import causal_conv1d, chunk_gated_delta_rule, l2norm, recurrent_gated_delta_rule

log = logging.getLogger(__name__)
CPU_KERNEL_HEAD_DIMS = (64, 128)
CUDA_CONV_WIDTHS = (2, 3, 4)
_LOGGED: set[str] = set()


def mixer_dims(config, gated: bool) -> tuple[int, int, int, int]:
    """(key heads, value heads, key head dim, value head dim) of fla's layer for ``config``."""
    if gated:
        return (config.num_heads, config.num_v_heads or config.num_heads, config.head_dim,
                int(config.head_dim * config.expand_v))
    h = config.num_heads
    return h, h, round(config.hidden_size * config.expand_k) // h, round(config.hidden_size * config.expand_v) // h


def kernel_unfit_reason(dtype: torch.dtype, head_k_dim: int, head_v_dim: int, allow_neg_eigval: bool) -> str | None:
    """Why vLLM's CPU GDN kernels cannot serve a layer (None: they can)."""
    if dtype != torch.bfloat16:
        return f"dtype {dtype} (the CPU kernels are bf16 only)"
    if head_k_dim != head_v_dim or head_k_dim not in CPU_KERNEL_HEAD_DIMS:
        return f"head dims k={head_k_dim}, v={head_v_dim} (the kernels need k == v in {CPU_KERNEL_HEAD_DIMS})"
    if allow_neg_eigval:
        return "allow_neg_eigval (beta in (0, 2); the fused decode kernel computes sigmoid(b))"
    return None


def select_core(platform, config, dtype: torch.dtype, head_k_dim: int, head_v_dim: int) -> tuple[str, str | None]:
    """('cuda' | 'cpu_kernel' | 'torch', why not the CPU kernels) for a layer of fla ``config`` on ``platform``.

    Raises NotImplementedError (one line) for a config vLLM's CUDA core cannot serve, or a
    platform other than CUDA and CPU."""
    if platform.is_cuda():
        if config.conv_size not in CUDA_CONV_WIDTHS:
            raise NotImplementedError(f"conv_size={config.conv_size}: vLLM's GDN CUDA conv kernels take "
                                      f"widths {CUDA_CONV_WIDTHS}")
        return "cuda", None
    if platform.is_cpu():
        reason = kernel_unfit_reason(dtype, head_k_dim, head_v_dim, config.allow_neg_eigval)
        return ("torch" if reason else "cpu_kernel"), reason
    raise NotImplementedError(f"refine_ray's vLLM plugin runs on CUDA and CPU platforms, not {platform.device_name!r}")


class FusedShortConv(nn.Module):
    """fla's q/k/v short convs (no bias) fused over this rank's q|k|v channels, vLLM's GDN conv
    layout: ``weight`` [conv_dim / tp, 1, W] loaded by vLLM's fused conv loader (shard 0/1/2 = fla's q/k/v_conv1d, each sliced to this rank's heads). Without a short
    conv in the checkpoint, ``weight`` is the identity kernel (a non-persistent buffer).

    A plain module, not ``ColumnParallelLinear`` as in OLMo's layer: vLLM's CPU post-load
    step repacks a bf16 [C, 1, 4] linear weight for its C++ conv (on AVX512-BF16 CPUs), which
    the PyTorch core cannot read."""

    def __init__(self, dims: list[int], width: int, in_checkpoint: bool, tp_size: int, tp_rank: int,
                 dtype: torch.dtype):
        super().__init__()
        rows = sum(dims) // tp_size
        if not in_checkpoint:
            identity = torch.zeros(rows, 1, width, dtype=dtype)
            identity[..., -1] = 1
            self.register_buffer("weight", identity, persistent=False)
            return
        self.weight = nn.Parameter(torch.empty(rows, 1, width, dtype=dtype), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": _make_fused_conv1d_weight_loader(dims, tp_size, tp_rank)})

    def load_weights(self, weights) -> set[str]:
        """(name, tensor with ``shard_id``) pairs, as vLLM's WeightsMapper yields stacked weights."""
        loaded = set()
        for name, w in weights:
            param = getattr(self, name)
            param.weight_loader(param, w, w.shard_id)
            loaded.add(name)
        return loaded


class FlaDeltaRuleMixer(OlmoHybridGatedDeltaNetAttention):
    """One fla DeltaNet (``gated=False``) or GatedDeltaNet (``gated=True``) mixer over vLLM's state cache.

    Modules (this rank's shard; fla's names are mapped by the model's ``hf_to_vllm_mapper``):
    ``in_proj`` [q|k|v(|g)] (MergedColumnParallelLinear), ``b_proj`` (with beta), ``a_proj``,
    ``A_log``, ``dt_bias`` (gated; DeltaNet: constant buffers -inf / 0), ``conv1d``
    (:class:`FusedShortConv`), ``o_norm`` (RMSNormGated over a head), ``o_proj`` (RowParallelLinear).
    """

    def __init__(self, config, vllm_config: VllmConfig, prefix: str, gated: bool):
        config.rms_norm_eps = getattr(config, "rms_norm_eps", config.norm_eps)  # read by the GDN base class
        config.hidden_act = getattr(config, "hidden_act", "swish")
        GatedDeltaNetAttention.__init__(self, config, vllm_config, prefix)  # not OLMo's (see the module doc)
        if self.num_spec:
            raise NotImplementedError("refine_ray's vLLM plugin: no speculative decoding")
        if not gated and (config.qk_activation != "silu" or config.qk_norm != "l2"):
            raise NotImplementedError(f"{prefix}: DeltaNet qk_activation={config.qk_activation!r}, "
                                      f"qk_norm={config.qk_norm!r}: the vLLM plugin serves 'silu' / 'l2' only")
        D, tp = config.hidden_size, self.tp_size
        self.gated = gated
        self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim = mixer_dims(config, gated)
        for field, heads in (("num_heads", self.num_k_heads), ("num_v_heads", self.num_v_heads)):
            if heads % tp:
                raise ValueError(f"{prefix}: {field}={heads} is not divisible by tensor_parallel_size={tp}")
        self.use_beta = gated or config.use_beta
        self.use_gate, self.use_short_conv = config.use_gate, config.use_short_conv
        self.allow_neg_eigval = config.allow_neg_eigval
        self.conv_kernel_size = config.conv_size
        self.norm_eps = config.norm_eps
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        HV, dt, qc = self.num_v_heads // tp, vllm_config.model_config.dtype, self.quant_config
        self.core, reason = select_core(current_platform, config, dt, self.head_k_dim, self.head_v_dim)

        outs = [self.key_dim, self.key_dim, self.value_dim] + ([self.value_dim] if self.use_gate else [])
        self.in_proj = MergedColumnParallelLinear(D, outs, bias=False, quant_config=qc, prefix=f"{prefix}.in_proj")
        self.b_proj = (ColumnParallelLinear(D, self.num_v_heads, bias=False, quant_config=qc, prefix=f"{prefix}.b_proj")
                       if self.use_beta else None)
        if gated:
            self.a_proj = ColumnParallelLinear(D, self.num_v_heads, bias=False, quant_config=qc,
                                               prefix=f"{prefix}.a_proj")
            self.A_log = nn.Parameter(torch.empty(HV, dtype=torch.float32), requires_grad=False)
            self.dt_bias = nn.Parameter(torch.empty(HV, dtype=torch.float32), requires_grad=False)
            for p in (self.A_log, self.dt_bias):
                set_weight_attrs(p, {"weight_loader": sharded_weight_loader(0)})
        else:  # no decay: exp(A_log) = 0
            self.a_proj = None
            self.register_buffer("A_log", torch.full((HV,), float("-inf")), persistent=False)
            self.register_buffer("dt_bias", torch.zeros(HV), persistent=False)
        self.conv1d = FusedShortConv([self.key_dim, self.key_dim, self.value_dim], config.conv_size,
                                     self.use_short_conv, tp, self.tp_rank, dt)
        # fla keeps a gate-free o_norm's weight in fp32; the gated one in the model dtype.
        self.o_norm = RMSNormGated(self.head_v_dim, eps=self.norm_eps, norm_before_gate=True,
                                   dtype=dt if self.use_gate else torch.float32,
                                   activation=getattr(config, "output_gate_activation", "swish") if gated else "swish")
        self.o_proj = RowParallelLinear(self.value_dim, D, bias=False, input_is_parallel=True, quant_config=qc,
                                        prefix=f"{prefix}.o_proj")

        key = f"{type(config).__name__}:{self.core}:{reason}"
        if key not in _LOGGED:
            _LOGGED.add(key)
            names = {"cuda": "vLLM Triton (CUDA)", "cpu_kernel": "vLLM CPU kernel", "torch": "PyTorch"}
            log.warning("refine_ray vLLM plugin: %s layers use the %s delta-rule core%s", type(config).__name__,
                        names[self.core], f" ({reason})" if reason else "")
        compilation_config = get_current_vllm_config().compilation_config
        if prefix in compilation_config.static_forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        compilation_config.static_forward_context[prefix] = self

    # ------------------------------------------------------------------ forward (inside vLLM's opaque op)
    def _full_forward(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        """hidden_states [N, D] -> output[:N] [N, D] (o_proj all-reduces across TP ranks)."""
        n, HV = hidden_states.size(0), self.num_v_heads // self.tp_size
        proj, _ = self.in_proj(hidden_states)
        c = self.conv_dim // self.tp_size
        mixed_qkv, gate = proj[:, :c], proj[:, c:]
        b = self.b_proj(hidden_states)[0] if self.use_beta else hidden_states.new_full((n, HV), float("inf"))
        a = self.a_proj(hidden_states)[0] if self.gated else hidden_states.new_zeros(n, HV)
        core_out = hidden_states.new_zeros(n, HV, self.head_v_dim)
        md = get_forward_context().attn_metadata
        md = md.get(self.prefix) if isinstance(md, dict) else None
        if md is not None:   # None: profile / warm-up runs
            if self.core == "cuda" and not (md.num_prefills and hidden_states.dtype == torch.float32):
                self._forward_core(mixed_qkv=mixed_qkv, b=b, a=a, core_attn_out=core_out)  # vLLM's CUDA core
            else:
                self._cpu_or_torch_core(md, mixed_qkv, b, a, core_out)
        normed = self.o_norm(core_out.reshape(-1, self.head_v_dim),
                             gate.reshape(-1, self.head_v_dim) if self.use_gate else None)
        output[:n], _ = self.o_proj(normed.reshape(n, -1))

    def _cpu_or_torch_core(self, md, mixed: torch.Tensor, b: torch.Tensor, a: torch.Tensor, out: torch.Tensor) -> None:
        """The ``torch`` / ``cpu_kernel`` cores over vLLM's metadata: decodes batched, prefills one by one."""
        conv_state = self.kv_cache[0] if is_conv_state_dim_first() else self.kv_cache[0].transpose(-1, -2)
        ssm = self.kv_cache[1]
        HV = self.num_v_heads // self.tp_size
        # [slots, HV, K, V] view of the [slots, HV, V, K] memory (see the module doc on layouts)
        ssm = (ssm.transpose(-1, -2) if self.core == "cuda"
               else ssm.view(ssm.shape[0], HV, self.head_k_dim, self.head_v_dim))
        idx = md.non_spec_state_indices_tensor.long()
        nd, ndt = md.num_decodes, md.num_decode_tokens
        if nd:
            sl = idx[:nd]
            y = self._conv(mixed[:ndt, None], conv_state, sl)                    # [nd, 1, conv_dim / tp]
            out[:ndt] = self._delta(y, b[:ndt, None], a[:ndt, None], ssm, sl)[:, 0]
        if md.num_prefills:
            starts = md.non_spec_query_start_loc[nd:nd + md.num_prefills + 1].tolist()
            has_init = md.has_initial_state[nd:nd + md.num_prefills].tolist()
            for i in range(md.num_prefills):   # varlen prefill, one sequence at a time (as vLLM's CPU path)
                s, e, sl = starts[i], starts[i + 1], idx[nd + i:nd + i + 1]
                if not has_init[i]:
                    conv_state[sl] = 0
                    ssm[sl] = 0
                y = self._conv(mixed[None, s:e], conv_state, sl)
                out[s:e] = self._delta(y, b[None, s:e], a[None, s:e], ssm, sl)[0]

    def _conv(self, x: torch.Tensor, conv_state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [B, T, C] -> silu(causal conv) [B, T, C], reading and updating the slots' conv tails."""
        if not self.use_short_conv:
            return F.silu(x)
        y, tail = causal_conv1d(x, self.conv1d.weight, None, conv_state[slots], "silu")
        conv_state[slots] = tail.to(conv_state.dtype)
        return y

    def _delta(self, y, b, a, ssm, slots) -> torch.Tensor:
        """Delta rule over y [B, T, C] from the slots' states ssm[slots] [B, HV, K, V] (updated in
        place); returns [B, T, HV, V]. fla's math: beta = sigmoid(b) (x2), g = -exp(A_log) softplus(a + dt_bias)."""
        B, T, _ = y.shape
        tp = self.tp_size
        Kd, H, HV = self.key_dim // tp, self.num_k_heads // tp, self.num_v_heads // tp
        q = y[..., :Kd].reshape(B, T, H, self.head_k_dim)
        k = y[..., Kd:2 * Kd].reshape(B, T, H, self.head_k_dim)
        v = y[..., 2 * Kd:].reshape(B, T, HV, self.head_v_dim)
        if self.core != "cpu_kernel":  # normalise in fp32 as fla's kernels do; the bf16 kernels want bf16 inputs
            q, k = q.float(), k.float()
        q, k = l2norm(q), l2norm(k)                                            # fla's eps 1e-6
        if HV != H:
            q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
        if self.core == "cpu_kernel":
            return self._delta_cpu_kernel(q, k, v, b, a, ssm, slots)
        beta = b.float().sigmoid() * (2.0 if self.allow_neg_eigval else 1.0)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float()) if self.gated else None
        h0 = ssm[slots].float()
        fn = recurrent_gated_delta_rule if T == 1 else chunk_gated_delta_rule
        o, h = fn(q, k, v, beta, g, initial_state=h0, output_final_state=True)
        ssm[slots] = h.to(ssm.dtype)
        return o

    def _delta_cpu_kernel(self, q, k, v, b, a, ssm, slots) -> torch.Tensor:
        """vLLM's bf16 CPU kernels; q, k already normalised with fla's eps (DeltaNet: A_log = -inf, a = 0)."""
        from vllm import _custom_ops as ops

        B, T, HV = v.shape[0], v.shape[1], v.shape[2]
        A_log, dt_bias = self.A_log.float(), self.dt_bias.to(b.dtype)   # as Qwen3-Next's CPU layer passes them
        if T == 1:  # decode: B sequences, one token each
            cu = torch.arange(B + 1, dtype=torch.int32, device=q.device)
            o = ops.fused_sigmoid_gating_delta_rule_update_cpu(
                A_log=A_log, dt_bias=dt_bias, q=q.transpose(0, 1).contiguous(), k=k.transpose(0, 1).contiguous(),
                v=v.transpose(0, 1).contiguous(), a=a[:, 0].contiguous(), b=b[:, 0].contiguous(),
                initial_state_source=ssm, initial_state_indices=slots.to(torch.int32), cu_seqlens=cu,
                use_qk_l2norm_in_kernel=False)
            return o.reshape(B, 1, HV, self.head_v_dim)
        g, beta = ops.fused_gdn_gating_cpu(A_log=A_log, a=a[0].contiguous(), b=b[0].contiguous(), dt_bias=dt_bias)
        cu = torch.tensor([0, T], dtype=torch.int32, device=q.device)
        o, _ = ops.chunk_gated_delta_rule_cpu(
            query=q.contiguous(), key=k.contiguous(), value=v.contiguous(), g=g, beta=beta, initial_state=ssm,
            output_final_state=True, cu_seqlens=cu, head_first=False, use_qk_l2norm_in_kernel=False,
            initial_state_indices=slots.to(torch.int32))
        return o.reshape(1, T, HV, self.head_v_dim)

"""fla's DeltaNet / GatedDeltaNet token mixer as a vLLM state-space layer (vLLM 0.32 internals).

The layer subclasses vLLM's ``GatedDeltaNetAttention`` so vLLM allocates its recurrent-state
cache (``MambaStateShapeCalculator.gated_delta_net_state_shape``: a conv tail
[slots, conv_dim, W-1] and a delta-rule state [slots, HV, V, K]) and builds
``GDNAttentionMetadata`` for it (decode requests first, then prefills with query_start_loc,
state slot indices and has_initial_state). Prefix caching in ``mamba_cache_mode='align'``
and the state-copy functions are vLLM's own.

Math (fla 0.6.0 fla/layers/{delta_net,gated_deltanet}.py, as refine_ray.models.layers):
q, k, v = silu(causal_conv(x W_{q,k,v})); q, k l2-normalised (eps 1e-6) per head,
beta = sigmoid(x W_b) (x2 with allow_neg_eigval), GatedDeltaNet's log decay
g = -exp(A_log) softplus(x W_a + dt_bias) (DeltaNet: no decay), delta rule over the state,
per-head RMSNorm of the output (gated by silu(x W_g) when use_gate), o_proj.

Two cores, chosen once per layer at build time and logged once:
  * ``vllm``: vLLM's CPU C++ kernels (``chunk_gated_delta_rule_cpu`` for prefill,
    ``fused_sigmoid_gating_delta_rule_update_cpu`` for decode). They need bf16, key head dim
    = value head dim in {64, 128}, no allow_neg_eigval, and a CPU platform. q/k are
    l2-normalised here with fla's eps 1e-6 (the kernels' own norm uses 1e-5); DeltaNet
    passes A_log = -inf, a = dt_bias = 0 so its decay is exactly 1.
  * ``torch``: refine_ray.models.ops (fp32 math, every config the models serve). Decode is
    one batched recurrence step over all decoding sequences (gather states by slot, step,
    scatter back); prefill runs the chunked form per sequence, as vLLM's CPU path does.
The short conv is always ours (vectorised PyTorch over the fused q|k|v channels): vLLM's
C++ conv needs weights packed at load time for width 4 only.
State layout: the cache's [slots, HV, V, K] memory is read as [slots, HV, K, V], exactly as
vLLM's CPU kernels read it, which is refine_ray's [B, H, K, V] layout.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.gdn.base import GatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateShapeCalculator, is_conv_state_dim_first
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

from refine_ray.models.ops import causal_conv1d, chunk_gated_delta_rule, l2norm, rms_norm, rms_norm_gated
from refine_ray.models.ops import recurrent_gated_delta_rule

log = logging.getLogger(__name__)
KERNEL_HEAD_DIMS = (64, 128)
_LOGGED: set[str] = set()


def kernel_unfit_reason(dtype: torch.dtype, head_k_dim: int, head_v_dim: int, allow_neg_eigval: bool) -> str | None:
    """Why vLLM's CPU GDN kernels cannot serve a layer (None: they can)."""
    if not current_platform.is_cpu():
        return "not a CPU platform (the plugin's CUDA path is not written yet)"
    if dtype != torch.bfloat16:
        return f"dtype {dtype} (the CPU kernels are bf16 only)"
    if head_k_dim != head_v_dim or head_k_dim not in KERNEL_HEAD_DIMS:
        return f"head dims k={head_k_dim}, v={head_v_dim} (the kernels need k == v in {KERNEL_HEAD_DIMS})"
    if allow_neg_eigval:
        return "allow_neg_eigval (beta in (0, 2); the fused decode kernel computes sigmoid(b))"
    return None


class FlaDeltaRuleMixer(GatedDeltaNetAttention):
    """One fla DeltaNet (``gated=False``) or GatedDeltaNet (``gated=True``) mixer over vLLM's state cache.

    Parameters (fused where vLLM's cache is fused; ``load_fla_weight`` maps fla's names):
    qkv_weight [2*key_dim + value_dim, D] (q|k|v rows), conv_weight [conv_dim, W] (+ conv_bias),
    b_proj [HV, D], a_proj [HV, D], A_log [HV], dt_bias [HV] (gated only), g_proj [value_dim, D]
    (use_gate only), o_norm [head_v_dim], o_proj [D, value_dim].
    """

    def __init__(self, config, vllm_config: VllmConfig, prefix: str, gated: bool):
        config.rms_norm_eps = getattr(config, "rms_norm_eps", config.norm_eps)  # read by the base class
        config.hidden_act = getattr(config, "hidden_act", "swish")
        super().__init__(config, vllm_config, prefix)
        if self.tp_size != 1 or self.num_spec:
            raise NotImplementedError("refine_ray's vLLM plugin: tensor parallel size 1 and no speculative decoding")
        D = config.hidden_size
        self.gated = gated
        if gated:
            self.num_k_heads = config.num_heads
            self.num_v_heads = config.num_v_heads or config.num_heads
            self.head_k_dim = config.head_dim
            self.head_v_dim = int(config.head_dim * config.expand_v)
            self.use_beta = True
        else:
            if config.qk_activation != "silu" or config.qk_norm != "l2":
                raise NotImplementedError(f"{prefix}: DeltaNet qk_activation={config.qk_activation!r}, "
                                          f"qk_norm={config.qk_norm!r}: the vLLM plugin serves 'silu' / 'l2' only")
            self.num_k_heads = self.num_v_heads = config.num_heads
            self.head_k_dim = round(D * config.expand_k) // config.num_heads
            self.head_v_dim = round(D * config.expand_v) // config.num_heads
            self.use_beta = config.use_beta
        self.use_gate, self.use_short_conv = config.use_gate, config.use_short_conv
        self.allow_neg_eigval = config.allow_neg_eigval
        self.conv_kernel_size = config.conv_size
        self.norm_eps = config.norm_eps
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        HV, dt = self.num_v_heads, vllm_config.model_config.dtype

        self.qkv_weight = nn.Parameter(torch.empty(self.conv_dim, D, dtype=dt), requires_grad=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, config.conv_size, dtype=dt), requires_grad=False)
        self.conv_bias = (nn.Parameter(torch.zeros(self.conv_dim, dtype=dt), requires_grad=False)
                          if getattr(config, "conv_bias", False) else None)
        self.b_proj = nn.Parameter(torch.empty(HV, D, dtype=dt), requires_grad=False) if self.use_beta else None
        if gated:
            self.a_proj = nn.Parameter(torch.empty(HV, D, dtype=dt), requires_grad=False)
            self.A_log = nn.Parameter(torch.empty(HV, dtype=torch.float32), requires_grad=False)
            self.dt_bias = nn.Parameter(torch.empty(HV, dtype=torch.float32), requires_grad=False)
        self.g_proj = nn.Parameter(torch.empty(self.value_dim, D, dtype=dt), requires_grad=False) if self.use_gate else None
        # fla keeps a gate-free o_norm in fp32; the gated one in the model dtype.
        self.o_norm = nn.Parameter(torch.ones(self.head_v_dim, dtype=dt if self.use_gate else torch.float32),
                                   requires_grad=False)
        self.o_proj = nn.Parameter(torch.empty(D, self.value_dim, dtype=dt), requires_grad=False)

        for p in self.parameters(recurse=False):
            set_weight_attrs(p, {"weight_loader": _load_rows})

        reason = kernel_unfit_reason(dt, self.head_k_dim, self.head_v_dim, self.allow_neg_eigval)
        self.core = "torch" if reason else "vllm"
        key = f"{type(config).__name__}:{self.core}:{reason}"
        if key not in _LOGGED:
            _LOGGED.add(key)
            log.warning("refine_ray vLLM plugin: %s layers use the %s delta-rule core%s", type(config).__name__,
                        "vLLM CPU kernel" if reason is None else "PyTorch", "" if reason is None else f" ({reason})")
        compilation_config = get_current_vllm_config().compilation_config
        if prefix in compilation_config.static_forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        compilation_config.static_forward_context[prefix] = self

    # ------------------------------------------------------------------ vLLM layer contract
    def get_state_shape(self):
        """(conv tail shape, recurrent state shape [HV, V, K]) per slot, vLLM's GDN layout."""
        return MambaStateShapeCalculator.gated_delta_net_state_shape(
            self.tp_size, self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim,
            self.conv_kernel_size, self.num_spec)

    def load_fla_weight(self, name: str, w: torch.Tensor) -> bool:
        """Copy fla parameter ``attn.<name>`` into the fused layout; False for an unknown name.

        Goes through each parameter's ``weight_loader`` (:func:`_load_rows`): vLLM's in-place
        reload swaps parameters for meta tensors and wraps their loaders to buffer the copies."""
        rows = {"q": 0, "k": self.key_dim, "v": 2 * self.key_dim}
        part, _, kind = name.partition(".")
        start = 0
        if part in ("q_proj", "k_proj", "v_proj"):
            attr, start = "qkv_weight", rows[part[0]]
        elif part in ("q_conv1d", "k_conv1d", "v_conv1d"):
            attr, start = ("conv_bias" if kind == "bias" else "conv_weight"), rows[part[0]]
        elif part in ("o_norm", "b_proj", "a_proj", "g_proj", "o_proj") and kind == "weight":
            attr = part
        elif part in ("A_log", "dt_bias") and self.gated:
            attr = part
        else:
            return False
        param = getattr(self, attr, None)
        if param is None:
            return False
        param.weight_loader(param, w, start)
        return True

    def forward(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        """hidden_states [N, D] -> output[:N] [N, D]; the whole mixer is one opaque custom op
        (as vLLM's OLMo-hybrid GDN) so torch.compile cannot reorder the recurrence's inputs."""
        torch.ops.vllm.refine_ray_fla_mixer(hidden_states, output, self.prefix)

    # ------------------------------------------------------------------ math
    def _full_forward(self, x: torch.Tensor, output: torch.Tensor) -> None:
        md = get_forward_context().attn_metadata
        if md is None or md.get(self.prefix) is None:  # profile / warm-up runs
            return
        md = md[self.prefix]
        n = md.num_actual_tokens
        x = x[:n]
        mixed = F.linear(x, self.qkv_weight)                                   # [n, conv_dim]
        b = F.linear(x, self.b_proj) if self.use_beta else x.new_zeros(n, self.num_v_heads)
        a = F.linear(x, self.a_proj) if self.gated else None
        o = x.new_zeros(n, self.num_v_heads, self.head_v_dim)
        conv_state = self.kv_cache[0] if is_conv_state_dim_first() else self.kv_cache[0].transpose(-1, -2)
        ssm = self.kv_cache[1]
        ssm = ssm.view(ssm.shape[0], self.num_v_heads, self.head_k_dim, self.head_v_dim)
        idx = md.non_spec_state_indices_tensor.long()
        qsl = md.non_spec_query_start_loc
        nd, ndt = md.num_decodes, md.num_decode_tokens
        if nd:
            sl = idx[:nd]
            y = self._conv(mixed[:ndt, None], conv_state, sl)                   # [nd, 1, conv_dim]
            o[:ndt] = self._delta(y, b[:ndt, None], None if a is None else a[:ndt, None], ssm, sl, None)[:, 0]
        if md.num_prefills:
            starts = qsl[nd:nd + md.num_prefills + 1].tolist()
            has_init = md.has_initial_state[nd:nd + md.num_prefills].tolist()
            for i in range(md.num_prefills):  # varlen prefill, one sequence at a time (as vLLM's CPU path)
                s, e, sl = starts[i], starts[i + 1], idx[nd + i:nd + i + 1]
                if not has_init[i]:
                    conv_state[sl] = 0
                    ssm[sl] = 0
                y = self._conv(mixed[None, s:e], conv_state, sl)
                o[s:e] = self._delta(y, b[None, s:e], None if a is None else a[None, s:e], ssm, sl,
                                     starts[i:i + 2])[0]
        output[:n] = self._output(x, o)

    def _conv(self, x: torch.Tensor, conv_state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [B, T, conv_dim] -> silu(causal conv) [B, T, conv_dim], reading and updating the slots' tails."""
        if not self.use_short_conv:
            return F.silu(x)
        y, tail = causal_conv1d(x, self.conv_weight, self.conv_bias, conv_state[slots], "silu")
        conv_state[slots] = tail.to(conv_state.dtype)
        return y

    def _delta(self, y, b, a, ssm, slots, span) -> torch.Tensor:
        """Delta rule over y [B, T, conv_dim] from the slots' states (updated in place); [B, T, HV, V]."""
        B, T, _ = y.shape
        Kd, H, HV = self.key_dim, self.num_k_heads, self.num_v_heads
        q = y[..., :Kd].reshape(B, T, H, self.head_k_dim)
        k = y[..., Kd:2 * Kd].reshape(B, T, H, self.head_k_dim)
        v = y[..., 2 * Kd:].reshape(B, T, HV, self.head_v_dim)
        if self.core == "torch":  # normalise in fp32 as fla's kernels do; the bf16 kernels want bf16 inputs
            q, k = q.float(), k.float()
        q, k = l2norm(q), l2norm(k)                                            # fla's eps 1e-6
        if HV != H:
            q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
        if self.core == "vllm":
            return self._delta_kernel(q, k, v, b, a, ssm, slots, span)
        beta = b.float().sigmoid() if self.use_beta else torch.ones_like(b, dtype=torch.float32)
        if self.allow_neg_eigval:
            beta = beta * 2.0
        g = None
        if a is not None:
            g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        h0 = ssm[slots].float()
        if T == 1:
            o, h = recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
        else:
            o, h = chunk_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
        ssm[slots] = h.to(ssm.dtype)
        return o

    def _delta_kernel(self, q, k, v, b, a, ssm, slots, span) -> torch.Tensor:
        """vLLM's bf16 CPU kernels; q, k already normalised with fla's eps."""
        from vllm import _custom_ops as ops

        B, T, HV = v.shape[0], v.shape[1], self.num_v_heads
        if a is None:  # DeltaNet: decay exactly 1 (exp(A_log) = 0)
            a = b.new_zeros(B, T, HV)
            A_log = torch.full((HV,), float("-inf"), device=b.device)
            dt_bias = b.new_zeros(HV)
        else:  # the kernels take A_log in fp32 and dt_bias in the activation dtype (as Qwen3-Next's layer)
            A_log, dt_bias = self.A_log.float(), self.dt_bias.to(b.dtype)
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

    def _output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm (gated by silu(x W_g) with use_gate), then o_proj: [n, D]."""
        o = o.to(x.dtype)
        if self.use_gate:
            gate = F.linear(x, self.g_proj).reshape(o.shape)
            o = rms_norm_gated(o, gate, self.o_norm, self.norm_eps, "swish")
        else:
            o = rms_norm(o, self.o_norm, self.norm_eps)
        return F.linear(o.reshape(o.shape[0], -1).to(x.dtype), self.o_proj)


def _load_rows(param: torch.Tensor, loaded_weight: torch.Tensor, start: int = 0) -> None:
    """Copy ``loaded_weight`` into rows [start, start + len) of ``param`` (a fused q|k|v block
    or a whole parameter); conv weights [C, 1, W] arrive in fla's nn.Conv1d layout."""
    n = loaded_weight.shape[0]
    param.data[start:start + n].copy_(loaded_weight.reshape(n, *param.shape[1:]))


def _mixer_op(hidden_states: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    get_forward_context().no_compile_layers[layer_name]._full_forward(hidden_states, output)


def _mixer_op_fake(hidden_states: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op(op_name="refine_ray_fla_mixer", op_func=_mixer_op, mutates_args=["output"],
                          fake_impl=_mixer_op_fake)

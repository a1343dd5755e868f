"""vLLM model classes for fla's ``DeltaNetForCausalLM`` and ``GatedDeltaNetForCausalLM`` checkpoints.

Serves config.json + weights exactly as fla 0.6.0 publishes them and ``refine-ray export``
writes them (model.embeddings, model.layers.i.{attn_norm, attn, mlp_norm, mlp}, model.norm,
lm_head; see refine_ray.models.deltanet). The token mixer is
:class:`refine_ray.serving.vllm_mixer.FlaDeltaRuleMixer`; norms and the SwiGLU MLP are the
same PyTorch ops as refine_ray's own model (refine_ray.models.ops), so fp32 logits match it.
Registered with vLLM by :func:`refine_ray.serving.vllm_plugin.register`.

Limits: tensor parallel size 1, no pipeline parallelism, no speculative decoding, no LoRA;
fla options refine_ray's model refuses (hybrid ``attn`` layers, ``use_l2warp``, ...) are
refused here with the same one-line error.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import (MambaStateCopyFuncCalculator,
                                                          MambaStateDtypeCalculator,
                                                          MambaStateShapeCalculator)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from refine_ray.models.ops import rms_norm, swiglu
from refine_ray.serving.vllm_mixer import FlaDeltaRuleMixer


def _check_supported(config) -> None:
    from refine_ray.models.deltanet import check_supported

    check_supported(config)


def _intermediate_size(config) -> int:
    """fla GatedMLP's sizing rule (refine_ray.models.layers.GatedMLP)."""
    if config.intermediate_size is not None:
        return config.intermediate_size
    ratio = config.hidden_ratio or 4
    size = int(config.hidden_size * ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


class _Norm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class _MLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        D, I = config.hidden_size, _intermediate_size(config)
        self.gate_proj = nn.Parameter(torch.empty(I, D, dtype=dtype), requires_grad=False)
        self.up_proj = nn.Parameter(torch.empty(I, D, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(D, I, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(swiglu(F.linear(x, self.gate_proj), F.linear(x, self.up_proj)), self.down_proj)


class _Block(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str, gated: bool):
        super().__init__()
        dt = vllm_config.model_config.dtype
        self.attn_norm = _Norm(config.hidden_size, config.norm_eps, dt)
        self.attn = FlaDeltaRuleMixer(config, vllm_config, f"{prefix}.attn", gated)
        self.mlp_norm = _Norm(config.hidden_size, config.norm_eps, dt)
        self.mlp = _MLP(config, dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.empty_like(x)
        self.attn(self.attn_norm(x), o)
        h = x + o
        return h + self.mlp(self.mlp_norm(h))


class _FlaCausalLM(nn.Module, HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching):
    """Embeddings -> blocks -> final RMSNorm -> lm_head, one fla checkpoint layout for both types."""

    gated: bool

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        _check_supported(config)
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise NotImplementedError("refine_ray's vLLM plugin: pipeline parallel size 1 only")
        self.config = config
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([_Block(config, vllm_config, f"model.layers.{i}", self.gated)
                                     for i in range(config.num_hidden_layers)])
        self.norm = _Norm(config.hidden_size, config.norm_eps, vllm_config.model_config.dtype)
        if config.tie_word_embeddings:
            self.lm_head = self.embeddings
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        """input_ids [N] (all scheduled tokens, flat) -> final-normed hidden [N, D]."""
        h = inputs_embeds if inputs_embeds is not None else self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # ------------------------------------------------------------------ state cache
    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return MambaStateDtypeCalculator.gated_delta_net_state_dtype(
            vllm_config.model_config.dtype, vllm_config.cache_config.mamba_cache_dtype,
            vllm_config.cache_config.mamba_ssm_cache_dtype)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        c = vllm_config.model_config.hf_config
        if cls.gated:
            hk, hv = c.num_heads, c.num_v_heads or c.num_heads
            dk, dv = c.head_dim, int(c.head_dim * c.expand_v)
        else:
            hk = hv = c.num_heads
            dk, dv = round(c.hidden_size * c.expand_k) // hk, round(c.hidden_size * c.expand_v) // hv
        return MambaStateShapeCalculator.gated_delta_net_state_shape(1, hk, hv, dk, dv, c.conv_size, 0)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.gated_delta_net_state_copy_func()

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """fla-named tensors -> this model; returns the parameter names loaded.

        Raises:
            ValueError: a tensor name this layout does not have (one line, naming it).
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, w in weights:
            if name.startswith("model."):
                name = name[len("model."):]
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            if len(parts) > 3 and parts[0] == "layers" and parts[2] == "attn":
                mixer = self.layers[int(parts[1])].attn
                if not mixer.load_fla_weight(".".join(parts[3:]), w):
                    raise ValueError(f"checkpoint tensor {name!r}: not a parameter of this {type(self).__name__}")
                loaded.add(name)
                continue
            if len(parts) == 5 and parts[2] == "mlp" and parts[4] == "weight":
                name = ".".join(parts[:4])  # mlp.gate_proj.weight -> mlp.gate_proj (a bare Parameter)
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r}: not a parameter of this {type(self).__name__}")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, w)
            loaded.add(name)
        # The mixers' fused parameters count as loaded once any of their parts was.
        loaded |= {n for n in params if ".attn." in n}
        return loaded


class DeltaNetForCausalLM(_FlaCausalLM):
    """fla's DeltaNetForCausalLM (model_type 'delta_net') on vLLM."""
    gated = False


class GatedDeltaNetForCausalLM(_FlaCausalLM):
    """fla's GatedDeltaNetForCausalLM (model_type 'gated_deltanet') on vLLM."""
    gated = True

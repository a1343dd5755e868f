"""vLLM model classes for fla's ``DeltaNetForCausalLM`` and ``GatedDeltaNetForCausalLM`` checkpoints.

Serves config.json + weights exactly as fla 0.6.0 publishes them and ``refine-ray export``
writes them (model.embeddings, model.layers.i.{attn_norm, attn, mlp_norm, mlp}, model.norm,
lm_head; see refine_ray.models.deltanet), built as vLLM builds its own models (OLMo-hybrid's
layout, vllm/model_executor/models/olmo_hybrid.py): vLLM's parallel layers (vocab-parallel
embeddings and lm_head, merged column-parallel gate|up, row-parallel down projection), the
token mixer :class:`refine_ray.serving.vllm_mixer.FlaDeltaRuleMixer`, ``@support_torch_compile``
on the decoder stack, and weights loaded by vLLM's ``AutoWeightsLoader`` through a
``WeightsMapper`` that stacks fla's separate tensors into the fused parameters, each slice
taken by vLLM's sharded loaders for this tensor-parallel rank.
The RMSNorms and the SwiGLU product are refine_ray.models.ops (fla's math: weight applied in
fp32, one rounding), so fp32 logits match refine_ray's own model.

Missing tensors: vLLM's loader checks that every parameter was loaded, but exempts the
parameters of its linear layers in unquantized models, and a stacked parameter counts as
loaded once one of its parts was. So the first ``load_weights`` checks the names vLLM was given
against fla's layout for the config (:func:`checkpoint_names`) and refuses a checkpoint missing
any, with vLLM's own message. In-place reloads (``reload_weights``, which may send a subset)
are not checked, as vLLM checks them only with a warning.

Limits: no pipeline parallelism, no speculative decoding, no LoRA; fla options refine_ray's
model refuses (hybrid ``attn`` layers, ``use_l2warp``, ...) are refused here with the same
one-line error.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import (MambaStateCopyFuncCalculator,
                                                          MambaStateDtypeCalculator,
                                                          MambaStateShapeCalculator)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.sequence import IntermediateTensors

from refine_ray.models.ops import rms_norm, swiglu
from refine_ray.serving.vllm_mixer import FlaDeltaRuleMixer, mixer_dims


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


def checkpoint_names(config, gated: bool) -> list[str]:
    """Every tensor name of fla's checkpoint for ``config``; ``gated``: a GatedDeltaNet (decay gate
    ``a_proj``, ``A_log``, ``dt_bias``), else a DeltaNet (the model class's ``gated``)."""
    names = ["model.embeddings.weight", "model.norm.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    attn = ["q_proj", "k_proj", "v_proj", "o_proj", "o_norm"]
    attn += ["b_proj"] if gated or config.use_beta else []
    attn += ["a_proj"] if gated else []
    attn += ["g_proj"] if config.use_gate else []
    conv = ["q_conv1d", "k_conv1d", "v_conv1d"] if config.use_short_conv else []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + n for n in ("attn_norm.weight", "mlp_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight")]
        names += [f"{p}attn.{n}.weight" for n in attn + conv]     # fla's short convs have no bias
        names += [f"{p}attn.A_log", f"{p}attn.dt_bias"] if gated else []
    return names


class _Norm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class _MLP(nn.Module):
    """fla's GatedMLP: down(silu(gate(x)) * up(x)); gate|up column-parallel, down row-parallel."""

    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        D, I = config.hidden_size, _intermediate_size(config)
        qc = vllm_config.quant_config
        self.gate_up_proj = MergedColumnParallelLinear(D, [I, I], bias=False, quant_config=qc,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(I, D, bias=False, quant_config=qc, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)[0].chunk(2, dim=-1)
        return self.down_proj(swiglu(gate, up))[0]


class _Block(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str, gated: bool):
        super().__init__()
        dt = vllm_config.model_config.dtype
        self.attn_norm = _Norm(config.hidden_size, config.norm_eps, dt)
        self.attn = FlaDeltaRuleMixer(config, vllm_config, f"{prefix}.attn", gated)
        self.mlp_norm = _Norm(config.hidden_size, config.norm_eps, dt)
        self.mlp = _MLP(config, vllm_config, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.empty_like(x)
        self.attn(self.attn_norm(x), o)
        h = x + o
        return h + self.mlp(self.mlp_norm(h))


# Dims given explicitly: vLLM infers them from annotations, which are strings in this module.
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class _FlaModel(nn.Module):
    """Embeddings -> blocks -> final RMSNorm (fla's ``model.*``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", gated: bool = False):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embeddings")
        self.layers = nn.ModuleList([_Block(config, vllm_config, f"{prefix}.layers.{i}", gated)
                                     for i in range(config.num_hidden_layers)])
        self.norm = _Norm(config.hidden_size, config.norm_eps, vllm_config.model_config.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [N] (all scheduled tokens, flat) -> final-normed hidden [N, D]."""
        h = inputs_embeds if inputs_embeds is not None else self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class _FlaCausalLM(nn.Module, HasInnerState, IsAttentionFree, SupportsMambaPrefixCaching):
    """fla's causal LM on vLLM: ``model`` (:class:`_FlaModel`) and ``lm_head``."""

    gated: bool
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked={
        ".attn.q_proj": (".attn.in_proj", 0), ".attn.k_proj": (".attn.in_proj", 1),
        ".attn.v_proj": (".attn.in_proj", 2), ".attn.g_proj": (".attn.in_proj", 3),
        ".attn.q_conv1d": (".attn.conv1d", 0), ".attn.k_conv1d": (".attn.conv1d", 1),
        ".attn.v_conv1d": (".attn.conv1d", 2),
        ".mlp.gate_proj": (".mlp.gate_up_proj", 0), ".mlp.up_proj": (".mlp.gate_up_proj", 1),
    })

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        _check_supported(config)
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise NotImplementedError("refine_ray's vLLM plugin: pipeline parallel size 1 only")
        self.config = config
        self.model = _FlaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), gated=self.gated)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embeddings)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self._checkpoint_checked = False

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

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
        hk, hv, dk, dv = mixer_dims(c, cls.gated)
        return MambaStateShapeCalculator.gated_delta_net_state_shape(
            vllm_config.parallel_config.tensor_parallel_size, hk, hv, dk, dv, c.conv_size, 0)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.gated_delta_net_state_copy_func()

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """fla-named tensors -> this rank's shards (vLLM's loaders); returns the parameter names loaded.

        Raises:
            ValueError: a tensor this model does not have (vLLM's AutoWeightsLoader), or, on the
                first load, a checkpoint missing a tensor of fla's layout (vLLM's message, naming them).
        """
        given: set[str] = set()

        def recorded():
            for name, w in weights:
                given.add(name)
                yield name, w

        loaded = AutoWeightsLoader(self).load_weights(recorded(), mapper=self.hf_to_vllm_mapper)
        if not self._checkpoint_checked:
            missing = sorted(set(checkpoint_names(self.config, self.gated)) - given)
            if missing:
                raise ValueError(f"Following weights were not initialized from checkpoint: {missing}")
            self._checkpoint_checked = True
        return loaded


class DeltaNetForCausalLM(_FlaCausalLM):
    """fla's DeltaNetForCausalLM (model_type 'delta_net') on vLLM."""
    gated = False


class GatedDeltaNetForCausalLM(_FlaCausalLM):
    """fla's GatedDeltaNetForCausalLM (model_type 'gated_deltanet') on vLLM."""
    gated = True

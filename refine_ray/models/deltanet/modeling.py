"""DeltaNetForCausalLM and GatedDeltaNetForCausalLM on fla's own config classes (fla 0.6.0 ``fla/models``).

The two share one class hierarchy (backbone, causal LM, init, block); only the mixer
(``layers.delta_net`` / ``layers.gated_deltanet``) and fla's config class differ, hence
one family folder for both.

Parameter names/shapes equal fla 0.6.0's classes (``model.embeddings``, ``model.layers.i.
{attn_norm, attn, mlp_norm, mlp}``, ``model.norm``, ``lm_head``), so checkpoints load both
ways; ``model_type`` stays 'delta_net' / 'gated_deltanet'.

Two entry points:
  * ``forward_segment`` (the refine_ray contract, see base.py): no padding, explicit state.
  * ``forward`` (HF-compatible): right padding only; loss = mean CE over shifted labels
    that are != -100 and whose position has attention_mask == 1. With ``use_cache`` it
    carries the recurrent state as its cache, so transformers' ``generate`` works
    (:mod:`..hf_generate`).
Config options we do not implement raise a one-line ``NotImplementedError`` naming them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers import initialization as hf_init
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..base import FastWeightLM, ModelState, SegmentOutput, causal_lm_loss
from ..hf_generate import RecurrentGenerationMixin
from ..layers.common import GatedMLP, GatedRMSNorm, PreNormBlock, RMSNorm, check_right_padding
from ..layers.delta_net import DeltaNet
from ..layers.gated_deltanet import GatedDeltaNet
from ..ops.delta_rule import state_positions
from .config import DeltaNetConfig, GatedDeltaNetConfig, check_supported


def _mixer(config, layer_idx: int) -> nn.Module:
    """The token mixer fla's config asks for (DeltaNet or GatedDeltaNet), with its arguments."""
    if config.model_type == "delta_net":
        return DeltaNet(hidden_size=config.hidden_size, expand_k=config.expand_k, expand_v=config.expand_v,
                        num_heads=config.num_heads, use_beta=config.use_beta, use_gate=config.use_gate,
                        use_short_conv=config.use_short_conv, conv_size=config.conv_size,
                        allow_neg_eigval=config.allow_neg_eigval, qk_activation=config.qk_activation,
                        qk_norm=config.qk_norm, norm_eps=config.norm_eps, layer_idx=layer_idx)
    return GatedDeltaNet(hidden_size=config.hidden_size, expand_v=config.expand_v, head_dim=config.head_dim,
                         num_heads=config.num_heads, num_v_heads=config.num_v_heads, use_gate=config.use_gate,
                         use_short_conv=config.use_short_conv, allow_neg_eigval=config.allow_neg_eigval,
                         conv_size=config.conv_size, norm_eps=config.norm_eps,
                         output_gate_activation=getattr(config, "output_gate_activation", "swish"),
                         layer_idx=layer_idx)


def _block(config, layer_idx: int) -> PreNormBlock:
    """One fla block: the family's mixer and fla's GatedMLP (built in that order, as fla does)."""
    attn = _mixer(config, layer_idx)
    mlp = GatedMLP(config.hidden_size, config.hidden_ratio, config.intermediate_size, config.hidden_act)
    return PreNormBlock(config.hidden_size, config.norm_eps, attn, mlp, layer_idx)


class _PreTrained(PreTrainedModel):
    base_model_prefix = "model"
    # transformers derives every embedding accessor from this name (backbone: .embeddings,
    # causal LM: .model.embeddings and .lm_head), so no class writes its own.
    _input_embed_layer = "embeddings"
    _no_split_modules = ["PreNormBlock"]
    _is_stateful = True
    supports_gradient_checkpointing = True       # per block: PreNormBlock (base.enable_checkpointing)

    def _init_weights(self, module: nn.Module):
        """fla's init: N(0, initializer_range) for Linear/Conv1d/Embedding, ones for norms,
        Mamba-style A_log/dt_bias. hf_init skips tensors already loaded from a checkpoint."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            hf_init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            hf_init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            hf_init.ones_(module.weight)
        elif isinstance(module, GatedDeltaNet):
            if not (getattr(module.A_log, "_is_hf_initialized", False) or module.A_log.is_meta):
                module.reset_gate_parameters()


class _Backbone(_PreTrained):
    def __init__(self, config):
        super().__init__(config)
        check_supported(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([_block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, state: Optional[ModelState] = None):
        """Returns (final-normed hidden [B,T,D], new ModelState)."""
        hidden, new_state, _ = self.run(input_ids, state)
        return hidden, new_state

    def run(self, input_ids: torch.Tensor, state: Optional[ModelState] = None,
            lengths: Optional[torch.Tensor] = None, keep_states_at: Optional[torch.Tensor] = None):
        """(hidden, state, kept states); see ``_CausalLM.forward_segment`` for the options."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B,T] with T >= 1, got {tuple(input_ids.shape)}")
        if state is not None and len(state.layers) != len(self.layers):
            raise ValueError(f"state has {len(state.layers)} layers, model has {len(self.layers)}")
        B, T = input_ids.shape
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.long, device=input_ids.device)
            if lengths.shape != (B,) or bool((lengths < 1).any()) or bool((lengths > T).any()):
                raise ValueError(f"lengths must be [B={B}] with values in [1, {T}], got {lengths.tolist()}")
        if keep_states_at is not None:
            keep_states_at = state_positions(keep_states_at, T, input_ids.device)
        h = self.embeddings(input_ids)
        new_layers, kept_layers = [], []
        for i, layer in enumerate(self.layers):
            h, st, kept = layer(h, None if state is None else state.layers[i], lengths, keep_states_at)
            new_layers.append(st)
            kept_layers.append(kept)
        offset = (0 if state is None else state.offset) + T
        kept_states = None
        if keep_states_at is not None:
            # [B, P, ...] per key -> rows b*P + i: the state after keep_states_at[i] tokens of row b.
            kept_states = ModelState([{key: t.flatten(0, 1) for key, t in kept.items()} for kept in kept_layers])
        return self.norm(h), ModelState(new_layers, offset), kept_states


class _CausalLM(_PreTrained, FastWeightLM, RecurrentGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}
    offset_free_state = True        # no RoPE, no chunk phase: a state is the same at any offset

    def __init__(self, config):
        super().__init__(config)
        self.model = self._backbone_cls(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def init_state(self, batch_size: int, device=None, dtype=None) -> ModelState:
        """An explicit empty state (zeros), equal in effect to ``state=None``."""
        ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        with torch.no_grad():
            _, st = self.model(ids)
        st = st._map(torch.zeros_like)
        st.offset = 0
        return st if dtype is None else st.to(dtype=dtype)

    def forward_segment(self, input_ids: torch.Tensor, state: Optional[ModelState] = None,
                        return_logits: bool = True, lengths: Optional[torch.Tensor] = None,
                        keep_states_at: Optional[torch.Tensor] = None) -> SegmentOutput:
        """The base contract, plus two options for prefix sharing (offset-free states only):

        lengths [B]: row b's returned state is the state after its first ``lengths[b]``
            tokens (right padding; hidden/logits past a row's length are meaningless).
        keep_states_at [P] (positions in [1, T], any order): ``out.kept_states`` holds the
            states after that many tokens of the segment, rows ``b * P + i`` (offset 0: these
            states are position-free). The chunked kernels produce them in the same pass,
            differentiably.
        """
        hidden, new_state, kept = self.model.run(input_ids, state, lengths, keep_states_at)
        logits = self.lm_head(hidden) if return_logits else None
        return SegmentOutput(hidden=hidden, logits=logits, state=new_state, kept_states=kept)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, inputs_embeds=None, return_dict: Optional[bool] = None,
                cache=None, use_cache: Optional[bool] = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """HF forward over whole rows: input_ids [B,T] long, right-padded ``attention_mask`` [B,T] 0/1,
        ``labels`` [B,T] (-100 ignored) -> logits [B,T,V] (the last ``logits_to_keep`` positions when
        > 0 and no labels) and :func:`~..base.causal_lm_loss`. With ``use_cache=True`` or a ``cache``
        (``past_key_values``): rows continue the cache's recurrent state and the output carries the
        new one (:class:`~..hf_generate.RecurrentGenerationMixin`: what ``generate`` runs).

        Raises ValueError for left padding (with a cache: padding other than the prompts' left
        padding, see ``cached_forward``), NotImplementedError for inputs_embeds."""
        if inputs_embeds is not None:
            raise NotImplementedError("inputs_embeds is not supported; pass input_ids")
        cache = self.cache_argument(cache, kwargs)
        if cache is not None or use_cache:
            return self.cached_forward(input_ids, attention_mask, cache, labels, logits_to_keep, return_dict)
        if attention_mask is not None:
            check_right_padding(attention_mask)
        # Right padding + causality: pads only follow real tokens, so they cannot change real positions.
        hidden, _ = self.model(input_ids)
        if labels is None and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels, attention_mask)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class DeltaNetPreTrainedModel(_PreTrained):
    """HF base class for DeltaNet (config class: fla's DeltaNetConfig, model_type 'delta_net')."""
    config_class = DeltaNetConfig


class DeltaNetModel(DeltaNetPreTrainedModel, _Backbone):
    """DeltaNet backbone (fla.models.DeltaNetModel's parameters): ``forward(ids, state) -> (hidden, state)``."""


class DeltaNetForCausalLM(DeltaNetPreTrainedModel, _CausalLM):
    """DeltaNet LM: fla.models.DeltaNetForCausalLM's checkpoint layout plus ``forward_segment``."""
    _backbone_cls = DeltaNetModel


class GatedDeltaNetPreTrainedModel(_PreTrained):
    """HF base class for GatedDeltaNet (fla's GatedDeltaNetConfig, model_type 'gated_deltanet')."""
    config_class = GatedDeltaNetConfig


class GatedDeltaNetModel(GatedDeltaNetPreTrainedModel, _Backbone):
    """GatedDeltaNet backbone (fla.models.GatedDeltaNetModel's parameters)."""


class GatedDeltaNetForCausalLM(GatedDeltaNetPreTrainedModel, _CausalLM):
    """GatedDeltaNet LM: fla.models.GatedDeltaNetForCausalLM's checkpoint layout plus ``forward_segment``."""
    _backbone_cls = GatedDeltaNetModel


__all__ = ["DeltaNetForCausalLM", "DeltaNetModel", "GatedDeltaNetForCausalLM", "GatedDeltaNetModel",
           "DeltaNetConfig", "GatedDeltaNetConfig"]

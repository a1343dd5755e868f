"""LaCTForCausalLM: HF model + the refine_ray segment contract (``forward_segment``).

Checkpoint layout: ``model.embeddings``, ``model.layers.{i}.{attn_norm,attn,mlp_norm,mlp}``,
``model.norm``, ``lm_head`` (fla / upstream LaCT naming; see layer.py for ``attn.*``).

Deliberate differences from upstream LaCT:
  * Padding never reaches the model's recurrences: ``forward_segment`` takes
    unpadded rows, and ``forward`` accepts only *right* padding (left padding
    raises). With right padding every real position only depends on earlier real
    tokens (causal attention; a chunk's update is read only by later tokens), so
    real-position outputs are identical whatever the padding; pad labels are
    ignored by the loss. Upstream LaCT lets left pads enter the fast-weight
    updates and shifts chunk phase / RoPE positions with the padding.
  * A real generation cache: the state (fast weights after the last completed
    chunk, momentum, pending partial chunk, window KV, offset) lets decoding run
    one token at a time through ``forward_segment``, and transformers' ``generate``
    through the same state (:mod:`..hf_generate`); upstream LaCT re-runs the whole
    sequence per generated token.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..base import FastWeightLM, ModelState, SegmentOutput, causal_lm_loss
from ..hf_generate import RecurrentGenerationMixin
from ..layers.attention import rope_tables
from ..layers.common import GatedMLP, PreNormBlock, RMSNorm, check_right_padding
from ..layers.lact import LaCTLayer, LowRankFastWeight
from .config import LaCTConfig

try:
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init


def lact_block(config: LaCTConfig, layer_idx: int) -> PreNormBlock:
    """Upstream's ``LaCTBlock``: attn_norm -> LaCT layer -> residual, mlp_norm -> fla GatedMLP -> residual."""
    attn = LaCTLayer(config, layer_idx)
    mlp = GatedMLP(config.hidden_size, config.hidden_ratio, config.intermediate_size, config.hidden_act)
    return PreNormBlock(config.hidden_size, config.norm_eps, attn, mlp, layer_idx)


class LaCTPreTrainedModel(PreTrainedModel):
    """HF base class for LaCT: config class, checkpoint prefix, upstream's initialisation."""

    config_class = LaCTConfig
    base_model_prefix = "model"
    # transformers derives every embedding accessor from this name (backbone: .embeddings,
    # causal LM: .model.embeddings and .lm_head), so no class writes its own.
    _input_embed_layer = "embeddings"
    supports_gradient_checkpointing = True       # per block: PreNormBlock (base.enable_checkpointing)
    _no_split_modules = ["PreNormBlock"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, LowRankFastWeight):
            gain = module.init_gain
            _init.normal_(module.w_left, std=gain / module.rank ** 0.5)
            _init.normal_(module.w_right, std=gain / module.w_right.shape[-1] ** 0.5)
        elif isinstance(module, LaCTLayer):
            _init.ones_(module.qk_scale)
            _init.zeros_(module.qk_offset)
            _init.normal_(module.w1, std=1.0 / module.w1.shape[-1] ** 0.5)
            if isinstance(module.w0, nn.Parameter):
                for w in (module.w0, module.w2):
                    _init.normal_(w, std=1.0 / w.shape[-1] ** 0.5)


class LaCTModel(LaCTPreTrainedModel):
    """LaCT backbone: embeddings, blocks, final norm; ``run`` carries a :class:`ModelState`."""

    def __init__(self, config: LaCTConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([lact_block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def run(self, input_ids: torch.Tensor, state: Optional[ModelState], need_state: bool = True,
            output_hidden_states: bool = False):
        """Returns (normed last hidden [B,T,D], new ModelState or None, all hidden states or None)."""
        offset = 0 if state is None else state.offset
        x = self.embeddings(input_ids)
        pos = torch.arange(offset, offset + input_ids.shape[1], device=x.device)
        rope = rope_tables(pos, self.config.head_dim, self.config.rope_theta, torch.float32)
        all_hidden = [] if output_hidden_states else None
        new_layers = []
        for i, block in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(x)
            # a PreNormBlock: checkpointed there when enabled (base.enable_checkpointing)
            x, st = block(x, None if state is None else state.layers[i], offset, need_state, rope)
            new_layers.append(st)
        x = self.norm(x)
        if all_hidden is not None:
            all_hidden.append(x)
        new_state = ModelState(new_layers, offset + input_ids.shape[1]) if need_state else None
        return x, new_state, (tuple(all_hidden) if all_hidden is not None else None)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False, **kwargs):
        """HF backbone forward over whole rows: last hidden [B,T,D] (and all hidden states if asked)."""
        x, _, hs = self.run(input_ids, None, need_state=False, output_hidden_states=output_hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hs)


class LaCTForCausalLM(LaCTPreTrainedModel, FastWeightLM, RecurrentGenerationMixin):
    """LaCT LM: upstream's checkpoint layout, HF ``forward`` and the segment contract."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}
    offset_free_state = False       # RoPE and the chunk phase tie a state to its offset

    def __init__(self, config: LaCTConfig):
        super().__init__(config)
        self.model = LaCTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward_segment(self, input_ids: torch.Tensor, state: Optional[ModelState] = None,
                        return_logits: bool = True) -> SegmentOutput:
        """Run T unpadded tokens from ``state`` (None: empty, offset 0); see base.FastWeightLM.

        T may be 1 (cached decoding) or anything else; the returned state is exact
        at any cut, so segments can be split anywhere and chained. Gradients flow
        through the state.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
        if state is not None and state.batch_size not in (0, input_ids.shape[0]):
            raise ValueError(f"state has batch {state.batch_size}, input_ids {input_ids.shape[0]}")
        hidden, new_state, _ = self.model.run(input_ids, state, need_state=True)
        logits = self.lm_head(hidden) if return_logits else None
        return SegmentOutput(hidden=hidden, logits=logits, state=new_state)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, cache=None, use_cache: Optional[bool] = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Full-sequence forward. Right padding only; pad labels are ignored (-100).

        ``hidden_states`` (when requested) ends with the last layer after the final
        norm, as fla does. Logits at pad positions are meaningless; with ``logits_to_keep`` > 0
        and no labels only the last that many positions get logits. With ``use_cache=True`` or
        a ``cache`` (``past_key_values``) the rows continue the cache's state and the output
        carries the new one (:class:`~..hf_generate.RecurrentGenerationMixin`: what
        ``generate`` runs; prompts of one length, no padding then).
        """
        cache = self.cache_argument(cache, kwargs)
        if cache is not None or use_cache:
            return self.cached_forward(input_ids, attention_mask, cache, labels, logits_to_keep, return_dict)
        if attention_mask is not None:
            check_right_padding(attention_mask)
        hidden, _, all_hidden = self.model.run(input_ids, None, need_state=False,
                                               output_hidden_states=bool(output_hidden_states))
        if labels is None and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels, attention_mask)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=all_hidden)
        if return_dict is False:
            return out.to_tuple()
        return out

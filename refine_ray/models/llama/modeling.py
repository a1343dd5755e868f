"""A softmax-attention LM (transformers' Llama) behind the :class:`FastWeightLM` contract.

The fast-weight models are what REFINE is about; this one exists so that the whole
system (scorer, rollout, learner) can also train an architecture vLLM serves, which
makes the vLLM rollout backend (:mod:`refine_ray.serving.vllm_rollout`) usable end to end.

Deliberate decisions:
  * A thin subclass of transformers' ``LlamaForCausalLM``: same parameters, same
    checkpoint layout, same class name, so ``save_pretrained`` writes
    ``architectures: ["LlamaForCausalLM"]`` and both transformers and vLLM load what we
    save. HF's own ``forward`` (with ``attention_mask`` / ``labels``) is kept as is.
  * ``forward_segment`` runs the decoder with the HF modules' weights but its own
    attention loop, independent of transformers' cache classes (whose API and
    keyword names change between the versions .venv and .venv-vllm carry). The state
    is the KV cache: per layer ``{"k": [B, H_kv, T, D], "v": [B, H_kv, T, D]}``
    (post-RoPE keys, batch first, differentiable), ``offset = T``; positions continue
    from ``offset``. Tested equal to HF's forward.
  * Activation checkpointing: transformers' switch (``activation_checkpointing_enable``) marks
    the decoder layers; ``forward_segment`` checkpoints its own per-layer block under the same
    condition (training mode, gradients enabled), so both entry points honour it.
  * Not offset-free (``offset_free_state = False``): a state is tied to its length, so
    states of different lengths never share a batch (prefill / branching handle that).
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as _HFLlamaForCausalLM

from ..base import FastWeightLM, ModelState, SegmentOutput
from ..layers.attention import kv_cache_attention


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """Tiny preset: hidden 64, 2 layers, 4 query heads of dim 32, 2 KV heads, MLP 128.

    ``num_heads`` is accepted as an alias of ``num_attention_heads`` (what the policy
    config passes); ``num_key_value_heads`` defaults to 2 when it divides the head count
    (else one KV head per query head); ``intermediate_size`` to 2 x hidden when only
    the hidden size is overridden. ``head_dim`` defaults to hidden / heads but at least
    32: vLLM's CPU attention supports head sizes 32..512 only (Llama allows
    heads x head_dim != hidden; q/o projections map between the two).
    """
    if "num_heads" in overrides:
        heads = overrides.pop("num_heads")
        overrides.setdefault("num_attention_heads", heads)
    kw = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32768,
              rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
              hidden_act="silu")
    if "hidden_size" in overrides and "intermediate_size" not in overrides:
        kw["intermediate_size"] = 2 * overrides["hidden_size"]
    heads = overrides.get("num_attention_heads", kw["num_attention_heads"])
    if "num_key_value_heads" not in overrides and heads % kw["num_key_value_heads"] != 0:
        kw["num_key_value_heads"] = heads
    if "head_dim" not in overrides:
        kw["head_dim"] = max(32, overrides.get("hidden_size", kw["hidden_size"]) // heads)
    kw.update(overrides)
    if kw["hidden_size"] % kw["num_attention_heads"] != 0:
        raise ValueError(f"llama: hidden_size {kw['hidden_size']} is not divisible by "
                         f"num_attention_heads {kw['num_attention_heads']}")
    return LlamaConfig(**kw)


def _decoder_block(layer, h: torch.Tensor, cos, sin, past: Optional[dict]):
    """One ``LlamaDecoderLayer``'s computation on ``h [B,T,C]`` continuing the KV cache ``past``:
    (hidden [B,T,C], new KV), as transformers' layer but with our explicit KV state."""
    a, kv = kv_cache_attention(layer.self_attn, layer.input_layernorm(h), cos, sin, past)
    h = h + a
    return h + layer.mlp(layer.post_attention_layernorm(h)), kv


class LlamaForCausalLM(_HFLlamaForCausalLM, FastWeightLM):
    """transformers' Llama with ``forward_segment`` (KV-cache state); model_type 'llama'."""

    offset_free_state = False       # a KV cache's length is its offset

    def init_state(self, batch_size: int, device=None, dtype=None) -> ModelState:
        """An explicit empty state (length-0 KV), equal in effect to ``state=None``."""
        cfg = self.config
        p = next(self.parameters())
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (batch_size, cfg.num_key_value_heads, 0, head_dim)
        mk = lambda: torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)  # noqa: E731
        return ModelState([{"k": mk(), "v": mk()} for _ in range(cfg.num_hidden_layers)], 0)

    def forward_segment(self, input_ids: torch.Tensor, state: Optional[ModelState] = None,
                        return_logits: bool = True) -> SegmentOutput:
        """The base contract (see :class:`FastWeightLM`): T tokens continuing the KV cache ``state``
        at positions ``state.offset``..; raises ValueError for a state of another layer count."""
        backbone = self.model
        if state is not None and len(state.layers) != len(backbone.layers):
            raise ValueError(f"state has {len(state.layers)} layers, model has {len(backbone.layers)}")
        offset = 0 if state is None else state.offset
        B, T = input_ids.shape
        h = backbone.embed_tokens(input_ids)
        positions = (torch.arange(T, device=h.device) + offset)[None].expand(B, -1)
        cos, sin = backbone.rotary_emb(h, positions)
        new_layers = []
        for i, layer in enumerate(backbone.layers):
            past = None if state is None else state.layers[i]
            # transformers' checkpointing switch of the decoder layer, applied to our block
            if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
                h, kv = layer._gradient_checkpointing_func(_decoder_block, layer, h, cos, sin, past)
            else:
                h, kv = _decoder_block(layer, h, cos, sin, past)
            new_layers.append(kv)
        hidden = backbone.norm(h)
        logits = self.lm_head(hidden) if return_logits else None
        return SegmentOutput(hidden=hidden, logits=logits, state=ModelState(new_layers, offset + T))


__all__ = ["LlamaConfig", "LlamaForCausalLM", "tiny_llama_config"]

"""transformers' ``generate`` on our fast-weight models: a recurrent-state cache and the generation hooks.

``model.generate(...)`` (greedy, sampling, beam search, stopping criteria, streamers: all of
transformers' GenerationMixin) runs on :class:`RecurrentGenerationMixin` classes: the
DeltaNet family and LaCT. The cache is the model's own :class:`~.base.ModelState` (every
layer's recurrent state and the offset), so a decoding step feeds one token through
``forward_segment``, as our cached-state engine (:func:`~.generation.generate`) does; greedy
decoding gives the engine's tokens (tests/test_export.py).

Deliberate decisions:
  * The cache is created by the model's first forward (``use_cache=True``), not by
    ``generate``: transformers' DynamicCache holds attention keys and values, not fast weights.
  * No padding ever enters a recurrent state (the padding rule of base.py). Left-padded
    prompts of different lengths (what tokenizers give ``generate``) run unpadded, each from
    the empty state, for the DeltaNet family, whose states of different lengths share a batch;
    LaCT (position-dependent state) takes prompts of one length per call, else one line.
  * The cache keyword follows the installed transformers (``cache`` from 5.2x on,
    ``past_key_values`` before); both are accepted.
Source followed: transformers' GenerationMixin contract (``prepare_inputs_for_generation``, the cache
returned in the model output and fed back, ``reorder_cache`` for beam search).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from transformers import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .base import ModelState, causal_lm_loss, offset_free_state
from .generation import prefill

# The output field that carries the cache in the installed transformers (renamed in 5.2x).
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else \
    "past_key_values"


class RecurrentStateCache:
    """transformers' cache object for our models: wraps the :class:`ModelState` after the tokens so far.

    Implements what ``generate`` asks of a cache: ``get_seq_length`` (tokens consumed),
    ``reorder_cache`` (beam search: rows follow their beams); nothing to compile or crop.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, state: ModelState):
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the state has consumed (the same for every layer)."""
        return self.state.offset

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows ``beam_idx`` [B] (beam search's surviving beams), in place."""
        self.state = self.state.index(beam_idx)


class RecurrentGenerationMixin(GenerationMixin):
    """GenerationMixin for a :class:`~.base.FastWeightLM` with a recurrent state.

    Model classes inherit it and start their HF ``forward`` with :meth:`cached_forward`::

        cache = self.cache_argument(cache, kwargs)
        if cache is not None or use_cache:
            return self.cached_forward(input_ids, attention_mask, cache, labels, logits_to_keep, return_dict)
    """

    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False                            # the first forward makes the cache (module docstring)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask=None, use_cache=None,
                                      **kwargs) -> dict:
        """The next forward's inputs: the tokens the cache has not consumed yet (all of them at the
        first step), the attention mask, ``use_cache`` and the cache under this transformers' name."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, RecurrentStateCache):
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache,
                CACHE_FIELD: cache}

    def cached_forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       cache: Optional[RecurrentStateCache], labels: Optional[torch.Tensor] = None,
                       logits_to_keep: int = 0, return_dict: Optional[bool] = None):
        """``input_ids`` [B,T] continuing ``cache`` (None: from the start) -> CausalLMOutputWithPast (a
        tuple when ``return_dict`` is False) with logits [B,T',V] for the last ``logits_to_keep``
        positions (0 or ``labels`` given: all), the loss when ``labels`` is given (base.causal_lm_loss),
        and the new cache (in the output's cache field).

        A left-padded first call (prompts of different lengths, as tokenizers pad for ``generate``)
        runs each prompt without its pads (:func:`~.generation.prefill`) and returns the last
        position's logits [B,1,V]: only for models whose state does not depend on its position
        (the DeltaNet family, :func:`~.base.offset_free_state`).

        Raises:
            ValueError: one line, for padding anywhere else (right padding, with a cache, with
                ``labels``), left padding on a model whose state depends on its position, or a
                cache of another type.
        """
        name = type(self).__name__
        if cache is not None and not isinstance(cache, RecurrentStateCache):
            raise ValueError(f"{name}: expected a RecurrentStateCache (made by the model's first forward with "
                             f"use_cache=True), got {type(cache).__name__}")
        mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1]:].bool()
        if mask is not None and not bool(mask.all()):
            left = bool((mask.int().diff(dim=1) >= 0).all()) and bool(mask[:, -1].all())
            if cache is not None or labels is not None or not left:
                raise ValueError(f"{name}: padding is accepted only as the left padding of the prompts, without "
                                 f"labels (padding would enter the recurrent state)")
            if not offset_free_state(self):
                raise ValueError(f"{name}: prompts of different lengths cannot share one generate() call (this "
                                 f"model's state depends on its position); generate them one at a time or "
                                 f"grouped by length")
            state, hidden = prefill(self, [row[m] for row, m in zip(input_ids, mask)])
            state.offset = input_ids.shape[1]        # tokens consumed, pads included (the state ignores it)
            result = CausalLMOutputWithPast(logits=self.lm_head(hidden)[:, None],
                                            **{CACHE_FIELD: RecurrentStateCache(state)})
            return result.to_tuple() if return_dict is False else result
        out = self.forward_segment(input_ids, None if cache is None else cache.state, return_logits=False)
        keep = logits_to_keep if labels is None and logits_to_keep > 0 else out.hidden.shape[1]
        logits = self.lm_head(out.hidden[:, -keep:])
        loss = None if labels is None else causal_lm_loss(logits, labels, attention_mask)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: RecurrentStateCache(out.state)})
        return result.to_tuple() if return_dict is False else result

    @staticmethod
    def cache_argument(cache, kwargs: dict):
        """The cache passed to ``forward`` under either name (``cache`` or ``past_key_values``)."""
        return cache if cache is not None else kwargs.pop("past_key_values", None)

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
  * Prompts of one batch have one length: no padding ever enters a recurrent state (the
    padding rule of base.py). A batch whose ``attention_mask`` has zeros raises a one-line
    ValueError; generate such prompts one at a time (or grouped by length).
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

from .base import ModelState, causal_lm_loss

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

        Raises:
            ValueError: one line, for a padded batch (``attention_mask`` with zeros) or a cache of
                another type.
        """
        if cache is not None and not isinstance(cache, RecurrentStateCache):
            raise ValueError(f"{type(self).__name__}: expected a RecurrentStateCache (made by the model's first "
                             f"forward with use_cache=True), got {type(cache).__name__}")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(f"{type(self).__name__}: prompts of one generate() call must have one length without "
                             f"padding (padding would enter the recurrent state); generate them one at a time "
                             f"or grouped by length")
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

"""The contract every fast-weight language model in refine_ray fulfils.

REFINE needs more from a model than HF's ``forward``: the scorer, the rollout
engine and the prefix-shared learner all work on *segments* of a document with an
explicit recurrent state carried between them. Every model class (DeltaNet,
GatedDeltaNet, LaCT, and the Llama baseline) therefore implements
:meth:`FastWeightLM.forward_segment`.

Padding rule (deliberate, see docs): inputs to ``forward_segment`` contain no
padding. Every row of a segment batch has the same length and is real text, so
neither the fast-weight updates nor chunk alignment can depend on padding. Code
that batches documents of different lengths uses right padding and never reads
outputs or states past a row's real length, or runs rows one at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F


class ModelState:
    """Recurrent state of a whole model: one dict of batch-first tensors per layer.

    What a layer keeps is its own business (DeltaNet: ``recurrent`` [B,H,K,V] and
    conv tails; LaCT: fast weights, window KV, pending partial chunk, ...). This
    class only knows that every tensor has the batch on dim 0, which is all that
    batching, branching (repeat per sample) and transport need.
    ``offset`` counts tokens already consumed (positions for RoPE / chunk phase).
    """

    def __init__(self, layers: list[dict[str, torch.Tensor]], offset: int = 0):
        self.layers = layers
        self.offset = int(offset)

    @property
    def batch_size(self) -> int:
        """Rows B (dim 0 of any tensor; 0 for a state without tensors)."""
        for layer in self.layers:
            for t in layer.values():
                return int(t.shape[0])
        return 0

    def _map(self, fn) -> "ModelState":
        return ModelState([{k: fn(v) for k, v in layer.items()} for layer in self.layers], self.offset)

    def index(self, rows: torch.Tensor | list[int]) -> "ModelState":
        """Select (or repeat, e.g. ``repeat_interleave(G)``) batch rows."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return self._map(lambda t: t.index_select(0, rows.to(t.device)))

    def repeat_interleave(self, times: int) -> "ModelState":
        """Each row ``times`` times in a row (one branch per sample): B -> B * times."""
        return self._map(lambda t: t.repeat_interleave(times, dim=0))

    def detach(self) -> "ModelState":
        """The same tensors cut from the autograd graph."""
        return self._map(lambda t: t.detach())

    def to(self, device=None, dtype=None) -> "ModelState":
        """Moved to ``device``; floating tensors also cast to ``dtype`` (integer ones keep theirs)."""
        def move(t):
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)
        return self._map(move)

    @staticmethod
    def cat(states: Iterable["ModelState"]) -> "ModelState":
        """Concatenate states along the batch; all must share one offset."""
        states = list(states)
        if not states:
            raise ValueError("ModelState.cat needs at least one state")
        offsets = {s.offset for s in states}
        if len(offsets) != 1:
            raise ValueError(f"ModelState.cat: states have different offsets {sorted(offsets)}")
        layers = []
        for per_layer in zip(*(s.layers for s in states)):
            layers.append({k: torch.cat([d[k] for d in per_layer], 0) for k in per_layer[0]})
        return ModelState(layers, states[0].offset)

    # Transport: a flat dict of contiguous numpy arrays travels through the Ray
    # object store zero-copy, unlike a pickled list of tensors.
    def to_numpy(self) -> dict[str, np.ndarray]:
        """``{"__offset__": int64 scalar, "<layer>/<name>": array}``, detached CPU copies."""
        out: dict[str, np.ndarray] = {"__offset__": np.asarray(self.offset, dtype=np.int64)}
        for i, layer in enumerate(self.layers):
            for k, v in layer.items():
                out[f"{i}/{k}"] = v.detach().to("cpu").contiguous().numpy()
        return out

    @staticmethod
    def from_numpy(arrays: dict[str, np.ndarray], device=None) -> "ModelState":
        """Inverse of :meth:`to_numpy` (arrays copied, then moved to ``device``)."""
        n_layers = 1 + max(int(k.split("/", 1)[0]) for k in arrays if k != "__offset__")
        layers: list[dict[str, torch.Tensor]] = [{} for _ in range(n_layers)]
        for key, arr in arrays.items():
            if key == "__offset__":
                continue
            i, name = key.split("/", 1)
            layers[int(i)][name] = torch.from_numpy(np.array(arr)).to(device)
        return ModelState(layers, int(arrays["__offset__"]))


@dataclass
class SegmentOutput:
    """Output of :meth:`FastWeightLM.forward_segment`.

    hidden: [B, T, D] last-layer hidden states after the final norm (what
        REFINE's cosine reward compares, and what ``lm_head`` reads).
    logits: [B, T, V] or None when ``return_logits=False`` (callers that only
        need a few positions apply ``lm_head`` themselves to save memory).
    state:  the state after the segment's last token (differentiable: gradients
        flow back through it into earlier segments).
    kept_states: states inside the segment, for models that take ``keep_states_at``
        (DeltaNet family); None otherwise.
    """

    hidden: torch.Tensor
    logits: Optional[torch.Tensor]
    state: ModelState
    kept_states: Optional[ModelState] = None


class FastWeightLM:
    """Mixin documenting the interface; model classes inherit it next to PreTrainedModel.

    Required:
      forward_segment(input_ids [B,T] long, state: ModelState | None = None,
                      return_logits: bool = True) -> SegmentOutput
          Run T tokens starting from ``state`` (None = empty state, offset 0).
          Splitting a sequence into segments and carrying the state must equal
          one forward over the whole sequence (tested per model).
      lm_head: nn.Linear            the output projection
      config.model_type: str        a type of :mod:`refine_ray.models.registry`
      offset_free_state: bool       class attribute: the states do not depend on their position
                                    (read it with :func:`offset_free_state`; the registry's
                                    ``ModelFamily.offset_free_state`` reads the same attribute)
    Offset-free models (the DeltaNet family) also take ``lengths`` and ``keep_states_at`` in
    ``forward_segment`` (states at per-row lengths / at given positions of one pass).
    """

    offset_free_state: bool

    def forward_segment(self, input_ids: torch.Tensor, state: Optional[ModelState] = None,
                        return_logits: bool = True) -> SegmentOutput:  # pragma: no cover - interface
        """Run ``input_ids`` [B,T] long (no padding, T >= 1) from ``state`` (None: empty, offset 0)."""
        raise NotImplementedError


def offset_free_state(model) -> bool:
    """Whether ``model``'s states do not depend on their position (``ModelState.offset``).

    True for the DeltaNet family (no RoPE, no chunk phase): states taken at different
    positions of different documents share one batch, and a document's cut states come
    from one pass. False for LaCT (RoPE, chunk phase) and Llama (a KV cache's length is its
    offset). Read from the model's class (``FastWeightLM.offset_free_state``), the one place
    that says it; a wrapper that forwards attributes to its module (a DeepSpeed engine) works too.

    Raises:
        ValueError: ``model`` is not a :class:`FastWeightLM` (its class declares no ``offset_free_state``).
    """
    flag = getattr(model, "offset_free_state", None)
    if not isinstance(flag, bool):
        raise ValueError(f"{type(model).__name__} declares no offset_free_state (not a refine_ray FastWeightLM)")
    return flag


def enable_checkpointing(model) -> None:
    """Turn on per-block activation checkpointing in ``model`` (any registry family), non-reentrant.

    transformers' own switch (``activation_checkpointing_enable``; ``gradient_checkpointing_enable``
    before 5.25) with ``use_reentrant=False`` (torch's recommended mode; it composes with
    DeepSpeed ZeRO 0-3 and lets gradients flow through the dict-valued layer states a block
    returns, which the reentrant mode would silently drop). Blocks then keep only their inputs
    and re-run in backward when called in training mode with gradients enabled; inference
    (``torch.no_grad``, eval mode) runs unchanged. Raises ValueError (transformers' one line)
    for a class without ``supports_gradient_checkpointing``.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:                                    # transformers < 5.25
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HF's causal-LM loss over right-padded rows: mean next-token cross-entropy.

    logits [B,T,V] (any float dtype; CE in fp32), labels [B,T] long (-100: ignored),
    attention_mask [B,T] 0/1 or None (positions with 0 are ignored too). Position t predicts
    labels[t+1]. Returns a scalar fp32 tensor; 0 (with a graph) when no position counts,
    never NaN (deliberate: HF returns NaN there).
    """
    shift_labels = labels[:, 1:].to(logits.device)
    valid = shift_labels != -100
    if attention_mask is not None:
        valid = valid & attention_mask[:, 1:].to(logits.device).bool()
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                         shift_labels.masked_fill(~valid, 0).reshape(-1), reduction="none")
    return (ce * valid.reshape(-1)).sum() / valid.sum().clamp(min=1)

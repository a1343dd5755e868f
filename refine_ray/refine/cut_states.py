"""The recurrent state at every cut of a document, from one pass over it.

Prefix sharing needs, for each cut c, the model's state after ``ids[:c]``. The scorer
(no grad) hands them to the rollout; it only knows the cuts after its pass (they are
sampled from the pass's entropies), so it works in two steps:

1. ``pass_keeping_states``: one pass over the document that also keeps the state every
   ``stride`` tokens;
2. ``states_at_cuts``: from the kept state before each cut, catch up on the < stride
   tokens up to the cut.

Two implementations, chosen by the model:

* offset-free states (DeltaNet family): the document is one ``forward_segment`` call whose
  chunked kernels return the kept states (``keep_states_at``), and all n catch-ups run as
  one right-padded batch with per-row ``lengths``: two calls, whatever n is.
* states tied to their position (LaCT's chunk phase, attention's KV cache): the pass runs
  in segments of ``stride`` tokens and each cut catches up on its own.

The learner knows its cuts before its pass, so it asks for the cut states directly
(``keep_states_at=cuts``, see ``sequence_logprobs``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from refine_ray.models.base import ModelState, offset_free_state
from refine_ray.models.ops import kernel_backend

# Kept states of the segmented pass: {position: state after it} (None = empty state).
Kept = Union[ModelState, dict[int, Optional[ModelState]]]


def resolve_state_stride(model, state_stride: int = 0) -> int:
    """The stride in tokens between kept states: ``state_stride``, or for 0 the default: 64 (one
    kernel chunk) where our chunk loop keeps states almost for free (DeltaNet family, PyTorch
    kernels); 512 where each kept state costs a call (fla's kernels run in slices, LaCT and
    attention in segments)."""
    if state_stride:
        return state_stride
    if offset_free_state(model) and kernel_backend(next(model.parameters())) == "torch":
        return 64
    return 512


def pass_keeping_states(model, ids: torch.Tensor, stride: int) -> tuple[torch.Tensor, Kept]:
    """One pass over ``ids [L]`` (long) that keeps the state every ``stride`` tokens.

    Returns ``(hidden [L, D], kept)``: the last-layer hidden states (model dtype) and, for
    offset-free models, one batched :class:`ModelState` whose row j is the state after
    (j+1)·stride tokens; otherwise ``{position: state after it}`` with ``{0: None}``.
    """
    if offset_free_state(model):
        every = torch.arange(1, ids.shape[0] // stride + 1, device=ids.device) * stride
        out = model.forward_segment(ids[None], None, return_logits=False, keep_states_at=every)
        return out.hidden[0], out.kept_states          # row j = state after (j+1)·stride tokens
    kept: dict[int, Optional[ModelState]] = {0: None}
    hidden_parts, state = [], None
    for start in range(0, ids.shape[0], stride):
        out = model.forward_segment(ids[None, start:start + stride], state, return_logits=False)
        hidden_parts.append(out.hidden[0])
        state = kept[start + out.hidden.shape[1]] = out.state
    return torch.cat(hidden_parts, 0), kept


def states_at_cuts(model, ids: torch.Tensor, cuts: torch.Tensor, kept: Kept, stride: int) -> list[ModelState]:
    """One batch-1 state per cut of ``cuts [n]`` (long prefix lengths), in cut order, each with
    ``offset`` = its cut: the kept state at or before the cut plus a catch-up over the
    < ``stride`` tokens up to it (``kept``/``stride`` from :func:`pass_keeping_states`)."""
    if not offset_free_state(model):
        states = []
        for c in cuts.tolist():
            base = (c // stride) * stride
            st = kept[base]
            if c > base:
                st = model.forward_segment(ids[None, base:c], st, return_logits=False).state
            states.append(st)
        return states
    batched = batched_states_at_cuts(model, ids, cuts, kept, stride)
    return [ModelState(batched.index([i]).layers, c) for i, c in enumerate(cuts.tolist())]


def batched_states_at_cuts(model, ids: torch.Tensor, cuts: torch.Tensor, kept: ModelState,
                           stride: int) -> ModelState:
    """Offset-free models: the cut states as one batch (row i = cut i, offset 0). Rows that end
    between kept states continue together as one right-padded batch with per-row lengths."""
    empty = kept.index([0])._map(torch.zeros_like) if kept.batch_size else model.init_state(1, device=ids.device)
    bank = ModelState.cat([empty, kept])                      # row j = state after j·stride tokens
    bases = torch.div(cuts, stride, rounding_mode="floor")
    start = bank.index(bases)
    lengths = cuts - bases * stride
    rows = torch.nonzero(lengths > 0).flatten()
    if not rows.numel():
        return start
    width = int(lengths.max())
    batch = ids.new_zeros(rows.numel(), width)                # pads never reach a state (lengths)
    for r, i in enumerate(rows.tolist()):
        b = int(bases[i]) * stride
        batch[r, :int(lengths[i])] = ids[b:b + int(lengths[i])]
    caught_up = model.forward_segment(batch, start.index(rows), return_logits=False, lengths=lengths[rows]).state
    if rows.numel() == cuts.numel():
        return ModelState(caught_up.layers, 0)
    # Rows on a kept state take it as is, the others their caught-up state.
    source = torch.arange(cuts.numel())
    source[rows.cpu()] = cuts.numel() + torch.arange(rows.numel())
    return ModelState.cat([ModelState(start.layers, 0), ModelState(caught_up.layers, 0)]).index(source)

"""Hidden states of a (frozen) model at sampled and at true continuations, for a collapse-proof reward.

REFINE's paper reward compares the *policy's* hidden states at the sampled and at the true
tokens, so the policy can raise it by making its hidden states alike (issue 15's probe: PG
only lifted that cosine 0.44 -> 0.66 while the same cosine on the initial model's states
stayed at 0.44). ``refine.reward_source=frozen`` reads both sides from a frozen reference model
(the initial weights) instead: the policy can then only raise the reward by sampling tokens
whose meaning, as the frozen model sees it, matches the truth.

:func:`continuation_hidden` runs any model over continuations from given cut states (also
used by the fixed-cut evaluation for the policy on random-token controls);
:func:`reference_hidden` does the whole document for one model: pass, cut states, both sides.
"""
from __future__ import annotations

from typing import Sequence

import torch

from refine_ray.algo import gather_targets
from refine_ray.models.base import ModelState, offset_free_state
from refine_ray.refine.cut_states import pass_keeping_states, resolve_state_stride, states_at_cuts


@torch.no_grad()
def continuation_hidden(model, states: Sequence[ModelState], tokens: torch.Tensor,
                        samples_per_prefix: int) -> torch.Tensor:
    """``[n*G, k, D]`` last-layer hidden states of ``model`` at the tokens ``tokens [n*G, k]``
    (long, rows cut-major then sample) continued from the n batch-1 cut ``states``.

    Row r, position i is the state at the position whose *input* is ``tokens[r, i]`` (the
    convention of ``algo.cuts.gather_targets`` and of the sampler's hidden states). One call
    for offset-free models, one per cut otherwise. Model dtype. Raises ValueError when
    ``tokens`` does not hold n*G rows.
    """
    n, G = len(states), samples_per_prefix
    if tokens.shape[0] != n * G:
        raise ValueError(f"continuation_hidden: {tokens.shape[0]} rows for {n} cuts x {G} samples")
    tokens = tokens.to(next(model.parameters()).device).long()
    if offset_free_state(model):
        state = ModelState.cat([ModelState(s.layers, 0) for s in states]).repeat_interleave(G)
        return model.forward_segment(tokens, state, return_logits=False).hidden
    return torch.cat([model.forward_segment(tokens[j * G:(j + 1) * G], states[j].repeat_interleave(G),
                                            return_logits=False).hidden for j in range(n)])


@torch.no_grad()
def reference_hidden(reference, ids: torch.Tensor, cuts: torch.Tensor, responses: torch.Tensor,
                     samples_per_prefix: int, state_stride: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference model's hidden states at one document's sampled and true continuations.

    Args:
        reference: a model with ``forward_segment`` (e.g. the frozen initial policy).
        ids: ``[L]`` long, the document. cuts: ``[n]`` long prefix lengths (ascending).
        responses: ``[n*G, k]`` long sampled continuations, rows cut-major then sample.
        state_stride: see :func:`refine_ray.refine.cut_states.resolve_state_stride`.

    Returns:
        ``(response_hidden [n*G, k, D], true_hidden [n, k, D])`` float32: what
        :class:`~refine_ray.refine.rewarding.SequenceRewarder` reads for the cosine reward,
        here from ``reference`` rather than the policy (one pass over the document, then the
        continuations from its cut states; the same numbers as re-encoding every prefix up to
        float rounding).

    Raises:
        ValueError: cuts out of range for ``ids`` and k, or rows not n*G.
    """
    device = next(reference.parameters()).device
    ids, cuts = ids.to(device).long(), torch.as_tensor(cuts, device=device).long().reshape(-1)
    stride = resolve_state_stride(reference, state_stride)
    hidden, kept = pass_keeping_states(reference, ids, stride)
    _, true_hidden = gather_targets(ids, hidden, cuts, responses.shape[1])
    states = states_at_cuts(reference, ids, cuts, kept, stride)
    response_hidden = continuation_hidden(reference, states, responses, samples_per_prefix)
    return response_hidden.float(), true_hidden.float()

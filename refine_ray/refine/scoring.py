"""Step 1-4 of REFINE for one document: scoring pass, cuts, ground truth, cut states.

One no-grad pass over the unpadded document gives the last-layer hidden states
and (chunked over the sequence) the per-token entropy. When the rollout will start
from cached states (prefix sharing), the same pass keeps the state every
``state_stride`` tokens and each cut catches up from the one before it
(:mod:`refine_ray.refine.cut_states`), instead of re-encoding every prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from refine_ray.algo import gather_targets, sample_cuts, token_entropy_from_hidden
from refine_ray.config import RefineConfig
from refine_ray.refine.cut_states import pass_keeping_states, resolve_state_stride, states_at_cuts
from refine_ray.models.base import ModelState


@dataclass
class DocumentScore:
    """What scoring one document yields (tensors on the model's device, the cut states where
    :func:`score_document`'s ``states_device`` says; n cuts, k = response_length)."""

    cuts: torch.Tensor            # [n]
    gt_ids: torch.Tensor          # [n, k]
    gt_hidden: torch.Tensor       # [n, k, D]
    cut_entropy: torch.Tensor     # [n] entropy of the first continuation token's prediction
    cut_hidden: torch.Tensor      # [n, D] hidden at cut-1 (predicts the first continuation token)
    cut_states: Optional[list[ModelState]] = None  # one per cut (batch 1 each)


def min_document_tokens(cfg: RefineConfig) -> int:
    """The fewest tokens a document needs for ``n_chunks`` cuts of ``response_length`` tokens after
    ``min_prefix`` (shorter documents make :func:`score_document` raise DocumentTooShort)."""
    return max(cfg.min_prefix, 1) + (cfg.n_chunks + 1) * cfg.response_length - 1


@torch.no_grad()
def score_document(model, ids: torch.Tensor, cfg: RefineConfig, generator: Optional[torch.Generator] = None,
                   with_states: bool = False, state_stride: int = 0,
                   states_device: Optional[Union[str, torch.device]] = "cpu",
                   cuts: Optional[torch.Tensor] = None) -> DocumentScore:
    """Score one unpadded document ``ids [L]`` (long) and choose its cuts (REFINE steps 1-2).

    One no-grad pass gives the hidden states and per-token entropy (nats, float32); ``n_chunks``
    cuts are drawn from it by ``refine``'s cut strategy with ``generator`` (keyed by the caller,
    see :mod:`refine_ray.refine.seeding`), or, given ``cuts`` (``[n_chunks]`` long prefix
    lengths), those are used as they are (cuts a caller holds fixed); the true next k tokens and
    their hidden states are read at every cut. ``with_states`` also returns the state at every
    cut (prefix sharing), kept every ``state_stride`` tokens (0: :func:`resolve_state_stride`'s
    default), on ``states_device``: host memory (``'cpu'``, the default), so that a caller
    scoring many documents (the scorer role: a whole batch before it returns, packed into numpy
    for transport anyway) holds at most one document's cut states on the accelerator, the one
    being scored; ``None`` keeps them on the model's device, for callers that sample from them
    at once (the local step, the held-out evaluation). The copy does not change a value.
    Source: the REFINE paper's entropy-weighted cut sampling; see ``refine_ray.algo.cuts``.
    Raises DocumentTooShort (refine_ray.algo) when ``ids`` has fewer than
    :func:`min_document_tokens` tokens; ValueError when given ``cuts`` are not ``n_chunks`` cuts
    with at least one token before and ``response_length`` tokens after each; FloatingPointError
    (one line) when the entropy is not finite (NaN or inf weights or activations), which would
    otherwise fail inside the cut sampler.
    """
    stride = resolve_state_stride(model, state_stride)
    if with_states:
        hidden, kept = pass_keeping_states(model, ids, stride)
    else:
        hidden = model.forward_segment(ids[None], None, return_logits=False).hidden[0]
    head = model.lm_head
    entropy = token_entropy_from_hidden(hidden, head.weight, lm_head_bias=getattr(head, "bias", None))
    if not torch.isfinite(entropy).all():
        bad = int((~torch.isfinite(entropy)).sum())
        raise FloatingPointError(f"the model's next-token entropy is not finite at {bad} of {entropy.numel()} "
                                 f"positions of a {ids.numel()}-token document (NaN or inf in the weights or "
                                 f"activations); nothing was sampled or applied")
    if cuts is None:
        cuts = sample_cuts(entropy, cfg.n_chunks, cfg.response_length, cfg.cut_strategy, cfg.min_prefix,
                           generator=generator)
    else:
        cuts = torch.as_tensor(cuts, dtype=torch.long, device=ids.device).reshape(-1)
        if cuts.numel() != cfg.n_chunks:
            raise ValueError(f"cuts: {cuts.numel()} given, refine.n_chunks={cfg.n_chunks} expected")
    gt_ids, gt_hidden = gather_targets(ids, hidden, cuts, cfg.response_length)   # checks the cuts' range
    score = DocumentScore(cuts=cuts, gt_ids=gt_ids, gt_hidden=gt_hidden.float(),
                          cut_entropy=entropy[cuts - 1], cut_hidden=hidden[cuts - 1].float())
    if with_states:
        states = states_at_cuts(model, ids, cuts, kept, stride)
        score.cut_states = states if states_device is None else [st.to(states_device) for st in states]
    return score

"""Log-probs of sampled continuations (and the NTP loss) for one document.

Two ways to get the same numbers, chosen by ``refine.prefix_sharing``:

* ``reencode`` (upstream ReFINE's method): every row is the prefix ``ids[:c]``
  followed by its continuation, run from scratch. Costs n·G full prefix passes.
* ``shared``: one trunk pass over the document that yields the state at every
  cut (DeltaNet family: one call with ``keep_states_at=cuts``; other models: the
  trunk is split at the cuts with the state carried). Gradients flow through those
  states into the trunk, so every branch still trains the fast-weight writes of its
  prefix. Each cut's G continuations run from the state at that cut. The NTP loss
  reads the same trunk. Costs one pass + n·G·k tokens.

Both return identical losses and gradients up to float rounding (tested).
The log-prob of continuation token i is read from the position whose input is
the token before it: the trunk's position c-1 for the first token, the branch's
position i-1 for the others.

ZeRO-3: every call of a partitioned module is a collective, so every rank must make
the same module calls whatever its data. Here the number of calls depends only on
n and G (distinct cuts give n+1 trunk segments), except the NTP loss's LM-head
chunks: callers pass ``ntp_head_calls``, the most any rank needs (see the learner).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from refine_ray.algo import logprobs_from_logits, ntp_loss_from_hidden
from refine_ray.models.base import ModelState, offset_free_state


@dataclass
class DocumentLogprobs:
    """Learner log-probs of one document's sampled continuations, and its NTP loss."""

    logprobs: torch.Tensor                # [n*G, k]
    ntp_loss: Optional[torch.Tensor]      # scalar, None when not requested


def document_logprobs(model, ids: torch.Tensor, cuts: torch.Tensor, responses: torch.Tensor,
                      samples_per_prefix: int, temperature: float = 1.0, shared: bool = True,
                      with_ntp: bool = True, ntp_head_calls: int = 0,
                      ntp_targets: Optional[torch.Tensor] = None) -> DocumentLogprobs:
    """Log-probs of ``responses [n*G, k]`` (long, row = cut*G + sample) after the prefixes
    ``ids[:cut]`` of ``ids [L]`` for ``cuts [n]``, differentiable in ``model``.

    Returns :class:`DocumentLogprobs` with ``logprobs [n*G, k]`` float32 under the tempered
    full distribution (``algo.logprobs_from_logits``, the sampler's own function) and, with
    ``with_ntp``, the document's mean NTP loss (nats). ``shared``: one trunk pass (prefix
    sharing) or re-encode every prefix (upstream ReFINE); same numbers up to float rounding.
    ``ntp_head_calls``: the NTP loss calls the LM head at least this many times (ZeRO-3).
    ``ntp_targets``: ``[L]`` bool, the tokens the NTP loss counts (None: all but the first)."""
    ntp = ntp_head_calls if with_ntp else None
    if shared:
        return _shared(model, ids, cuts, responses, samples_per_prefix, temperature, ntp, ntp_targets)
    return _reencode(model, ids, cuts, responses, samples_per_prefix, temperature, ntp, ntp_targets)


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden)


def document_ntp_loss(model, ids: torch.Tensor, hidden: Optional[torch.Tensor] = None,
                      head_calls: int = 0, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token CE over document ``ids [L]``; ``hidden [L, D]`` if a pass already made it.

    ``targets``: ``[L]`` bool, only these tokens count as targets (None: every token but the
    first); the mean is over the counted targets, 0 when there are none.

    The head module is called, not its weight read: under ZeRO-3 only a module call sees
    the gathered weight. Logits are built in chunks of 1024 positions (never [L, V] at
    once), in at least ``head_calls`` head calls (the extra ones empty).
    """
    if hidden is None:
        hidden = model.forward_segment(ids[None], None, return_logits=False).hidden[0]
    return ntp_loss_from_hidden(hidden[None], model.lm_head, ids[None], min_calls=head_calls,
                                targets=None if targets is None else targets[None])


def _shared(model, ids, cuts, responses, G, temperature, ntp_calls, ntp_targets) -> DocumentLogprobs:
    k = responses.shape[1]
    if offset_free_state(model):
        # Trunk: one call that also returns the (differentiable) state at every cut; all n·G
        # branches then run as one batch.
        out = model.forward_segment(ids[None], None, return_logits=False, keep_states_at=cuts)
        hidden = out.hidden[0]
        groups = [(cuts.tolist(), ModelState(out.kept_states.layers, 0))]
    else:
        hidden, states = _trunk_split_at_cuts(model, ids, cuts)
        groups = [([c], states[c]) for c in cuts.tolist()]
    logps, row = [], 0
    for group_cuts, state in groups:
        rows = responses[row:row + len(group_cuts) * G]                   # [m*G, k]
        row += len(group_cuts) * G
        idx = torch.tensor(group_cuts, device=hidden.device) - 1
        first = _head(model, hidden[idx]).repeat_interleave(G, 0)[:, None]  # [m*G, 1, V]
        if k > 1:
            branch = model.forward_segment(rows[:, :k - 1], state.repeat_interleave(G), return_logits=True)
            logits = torch.cat([first, branch.logits], 1)
        else:
            logits = first
        logps.append(logprobs_from_logits(logits, rows, temperature))
    ntp = None if ntp_calls is None else document_ntp_loss(model, ids, hidden, ntp_calls, ntp_targets)
    return DocumentLogprobs(torch.cat(logps, 0), ntp)


def _trunk_split_at_cuts(model, ids, cuts) -> tuple[torch.Tensor, dict[int, ModelState]]:
    """Segments [0, c1), [c1, c2), ..., [c_last, L) with the state carried: (hidden [L, D],
    {cut: state there}). For states tied to their position, which cannot be batched."""
    states: dict[int, ModelState] = {}
    hidden_parts, state, start = [], None, 0
    for end in sorted(set(int(c) for c in cuts.tolist())) + [ids.shape[0]]:
        if end > start:
            out = model.forward_segment(ids[None, start:end], state, return_logits=False)
            hidden_parts.append(out.hidden[0])
            state = out.state
        states[end] = state
        start = end
    return torch.cat(hidden_parts, 0), states


def _reencode(model, ids, cuts, responses, G, temperature, ntp_calls, ntp_targets) -> DocumentLogprobs:
    k = responses.shape[1]
    logps = []
    for j, c in enumerate(cuts.tolist()):
        rows = responses[j * G:(j + 1) * G]
        seq = torch.cat([ids[:c].expand(G, -1), rows], 1)                  # [G, c+k]
        out = model.forward_segment(seq, None, return_logits=False)
        logits = _head(model, out.hidden[:, c - 1:c + k - 1])
        logps.append(logprobs_from_logits(logits, rows, temperature))
    ntp = None if ntp_calls is None else document_ntp_loss(model, ids, None, ntp_calls, ntp_targets)
    return DocumentLogprobs(torch.cat(logps, 0), ntp)


def answer_nll(model, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``answer [A]`` given ``prompt [L]``: answer tokens only in the loss.

    The prompt runs as one segment without logits; the answer continues from its
    state, so no [L, V] logits are built for the prompt. The branch runs over the whole
    answer (its last logits unused) so that the module calls never depend on the
    answer's length, as ZeRO-3 needs. Raises ValueError for an empty answer.
    """
    if answer.shape[0] == 0:
        raise ValueError("answer_nll: the answer has no tokens")
    out = model.forward_segment(prompt[None], None, return_logits=False)
    first = _head(model, out.hidden[:, -1:])                              # predicts answer[0]
    branch = model.forward_segment(answer[None], out.state, return_logits=True)
    logits = torch.cat([first, branch.logits[:, :-1]], 1)                 # [1, A, V]
    return torch.nn.functional.cross_entropy(logits[0].float(), answer.long())

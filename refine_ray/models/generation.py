"""Prefill, sampling and greedy generation on top of ``forward_segment`` (any FastWeightLM).

Deliberate decisions:
  * No padding ever enters a state: ``prefill`` runs rows grouped by length. Rows of
    different lengths give states with different offsets; they are concatenated only for
    models whose state does not depend on the offset (:func:`~.base.offset_free_state`,
    DeltaNet family), with the batch state's offset = the longest prompt. Otherwise
    prefill such rows separately.
  * Decoding is O(1) per token: each step feeds one token through the recurrent state;
    nothing is re-prefilled.
  * ``logprobs`` are log softmax(logits / temperature) of the sampled token under the FULL
    tempered distribution, even when top-p sampling truncates it (the behaviour policy's
    log-prob that REFINE's importance ratios compare against a full-distribution learner),
    computed by the learner's own ``algo.logprobs_from_logits`` (picked logit minus
    logsumexp in float32: log_softmax was 1e-5-5e-5 off on trained weights, issue 15).
    temperature <= 0 means greedy, with logprobs from the untempered distribution.
  * Sampling is by inverse CDF on one uniform draw per row and token, so callers can key
    each row's draws by what the row is (never by which rows share the batch).
  * ``hidden[:, j]`` is the last-layer (final-normed) hidden state at the position whose
    INPUT is token j; producing the last one costs one extra decode step, after which
    ``state`` has consumed all k sampled tokens.
  * Sampling runs under ``torch.no_grad()``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from refine_ray.algo.losses import logprobs_from_logits

from .base import ModelState, offset_free_state


@dataclass
class Continuations:
    """k sampled tokens per row with their behaviour log-probs, hidden states and the state after them."""

    tokens: torch.Tensor    # [B, k] long
    logprobs: torch.Tensor  # [B, k] fp32
    hidden: torch.Tensor    # [B, k, D]
    state: ModelState       # after all k tokens


def prefill(model, prompts: Sequence[torch.Tensor]) -> tuple[ModelState, torch.Tensor]:
    """Run prompts (1-D LongTensors) and return (batched state, last-position hidden [B,D]), rows in
    prompt order, without gradients.

    Raises:
        ValueError: no prompts, an empty or non-1-D prompt, or prompts of different lengths
            for a model whose states are not offset-free.
    """
    if len(prompts) == 0:
        raise ValueError("prefill needs at least one prompt")
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        if p.dim() != 1 or p.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-D tensor, got shape {tuple(p.shape)}")
        groups[int(p.numel())].append(i)
    if len(groups) > 1 and not offset_free_state(model):
        raise ValueError("prompts of different lengths give states with different offsets for this model; "
                         "prefill them separately")
    device = next(model.parameters()).device
    order, states, hiddens = [], [], []
    with torch.no_grad():
        for length, rows in groups.items():
            ids = torch.stack([prompts[i] for i in rows]).to(device)
            out = model.forward_segment(ids, None, return_logits=False)
            order.extend(rows)
            states.append(out.state)
            hiddens.append(out.hidden[:, -1])
    offset = max(s.offset for s in states)
    for s in states:
        s.offset = offset
    state = ModelState.cat(states)
    hidden = torch.cat(hiddens, 0)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.as_tensor(order)] = torch.arange(len(order))
    return state.index(inverse), hidden.index_select(0, inverse.to(hidden.device))


def _pick(logits: torch.Tensor, temperature: float, top_p: float, uniform: Optional[torch.Tensor]):
    """One token per row from ``logits [B, V]``: (tokens [B] long, logprobs [B] float32).

    temperature > 0 samples by inverse CDF: row b takes the first token whose cumulative
    (top-p filtered, float64) probability exceeds ``uniform[b] * total`` (``uniform [B]`` in
    [0, 1), one draw per row, so a row's token depends on its own draw only). temperature <= 0
    is greedy. Log-probs come from :func:`refine_ray.algo.logprobs_from_logits` (picked logit
    minus logsumexp, float32), the learner's own function (issue 15: exact on-policy ratios).
    """
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, logprobs_from_logits(logits, tok)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p          # mass strictly above each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # keep the smallest nucleus (>= 1 token)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    cdf = probs.double().cumsum(-1)
    target = uniform.to(device=cdf.device, dtype=torch.float64)[:, None] * cdf[:, -1:]
    tok = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
    return tok, logprobs_from_logits(logits, tok, temperature)


def sample_continuations(model, state: ModelState, last_hidden: torch.Tensor, num_tokens: int,
                         temperature: float = 1.0, top_p: float = 1.0,
                         generator: Optional[torch.Generator] = None,
                         uniforms: Optional[torch.Tensor] = None) -> Continuations:
    """Sample ``num_tokens`` tokens per row from ``state`` (whose last hidden is ``last_hidden`` [B,D]).

    ``uniforms [B, num_tokens]`` (float, in [0, 1)): the draws of each row, e.g. from a per-row
    generator keyed by what the row is (refine_ray.refine.sampling); without them they are drawn
    from ``generator`` (CPU). Raises ValueError for num_tokens < 1, top_p outside (0, 1] or
    uniforms of the wrong shape.
    """
    if num_tokens < 1:
        raise ValueError("num_tokens must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    rows = last_hidden.shape[0]
    if uniforms is None:
        uniforms = torch.rand(rows, num_tokens, generator=generator, dtype=torch.float64,
                              device=generator.device if generator is not None else "cpu")
    elif tuple(uniforms.shape) != (rows, num_tokens):
        raise ValueError(f"uniforms: shape {tuple(uniforms.shape)}, expected ({rows}, {num_tokens})")
    toks, lps, hids = [], [], []
    with torch.no_grad():
        logits = model.lm_head(last_hidden)
        for t in range(num_tokens):
            tok, lp = _pick(logits, temperature, top_p, uniforms[:, t])
            out = model.forward_segment(tok[:, None], state)
            state = out.state
            logits = out.logits[:, -1]
            toks.append(tok)
            lps.append(lp)
            hids.append(out.hidden[:, -1])
    return Continuations(torch.stack(toks, 1), torch.stack(lps, 1), torch.stack(hids, 1), state)


def generate(model, prompt_ids: Union[torch.Tensor, Sequence[torch.Tensor]], max_new_tokens: int,
             temperature: float = 0.0, eos_token_id: Union[int, Sequence[int], None] = None,
             top_p: float = 1.0, generator: Optional[torch.Generator] = None, min_new_tokens: int = 0):
    """Generate for evaluation: greedy by default, O(1) per token, stops at EOS.

    ``min_new_tokens``: the EOS ids are masked out for the first steps (HF's ``min_length``).

    ``prompt_ids``: a 1-D tensor, a [B,T] tensor or a list of 1-D tensors. Returns the new
    tokens (EOS excluded) as a 1-D tensor for a 1-D prompt, else a list of 1-D tensors.
    Rows are grouped by prompt length and each group decodes as one batch.
    """
    single = isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() == 1
    prompts = [prompt_ids] if single else list(prompt_ids)
    eos = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    results: list[Optional[torch.Tensor]] = [None] * len(prompts)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[int(p.numel())].append(i)
    with torch.no_grad():
        for rows in groups.values():
            state, hidden = prefill(model, [prompts[i] for i in rows])
            logits = model.lm_head(hidden)
            out_tokens, done = [], torch.zeros(len(rows), dtype=torch.bool, device=hidden.device)
            for step in range(max_new_tokens):
                if step < min_new_tokens and eos:
                    logits = logits.index_fill(-1, torch.tensor(sorted(eos), device=logits.device), float("-inf"))
                draw = None if temperature <= 0 else torch.rand(
                    len(rows), generator=generator, dtype=torch.float64,
                    device=generator.device if generator is not None else "cpu")
                tok, _ = _pick(logits, temperature, top_p, draw)
                out_tokens.append(tok)
                if eos:
                    done |= torch.isin(tok, torch.tensor(sorted(eos), device=tok.device))
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                seg = model.forward_segment(tok[:, None], state)
                state, logits = seg.state, seg.logits[:, -1]
            gen = torch.stack(out_tokens, 1).cpu() if out_tokens else torch.zeros(len(rows), 0, dtype=torch.long)
            for r, i in enumerate(rows):
                seq = gen[r]
                hits = [j for j, t in enumerate(seq.tolist()) if t in eos]
                results[i] = seq[: hits[0]] if hits else seq
    return results[0] if single else results

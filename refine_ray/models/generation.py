"""Prefill, sampling and greedy generation on top of ``forward_segment`` (any FastWeightLM).

Deliberate decisions:
  * No padding ever enters a state: ``prefill`` runs rows grouped by length. Rows of
    different lengths give states with different offsets; they are concatenated only for
    models whose state does not depend on the offset (``offset_free_state = True``,
    DeltaNet family), with the batch state's offset = the longest prompt. Otherwise
    prefill such rows separately.
  * Decoding is O(1) per token: each step feeds one token through the recurrent state;
    nothing is re-prefilled.
  * ``logprobs`` are log_softmax(logits / temperature) of the sampled token under the FULL
    tempered distribution, even when top-p sampling truncates it (the behaviour policy's
    log-prob that REFINE's importance ratios compare against a full-distribution learner).
    temperature <= 0 means greedy, with logprobs from the untempered distribution.
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

from .base import ModelState


@dataclass
class Continuations:
    tokens: torch.Tensor    # [B, k] long
    logprobs: torch.Tensor  # [B, k] fp32
    hidden: torch.Tensor    # [B, k, D]
    state: ModelState       # after all k tokens


def prefill(model, prompts: Sequence[torch.Tensor]) -> tuple[ModelState, torch.Tensor]:
    """Run prompts (1-D LongTensors) and return (batched state, last-position hidden [B,D])."""
    if len(prompts) == 0:
        raise ValueError("prefill needs at least one prompt")
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        if p.dim() != 1 or p.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-D tensor, got shape {tuple(p.shape)}")
        groups[int(p.numel())].append(i)
    if len(groups) > 1 and not getattr(model, "offset_free_state", False):
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


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator):
    """Sample (or argmax) one token per row; return (tokens [B], logprobs [B])."""
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p          # mass strictly above each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # keep the smallest nucleus (>= 1 token)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def sample_continuations(model, state: ModelState, last_hidden: torch.Tensor, num_tokens: int,
                         temperature: float = 1.0, top_p: float = 1.0,
                         generator: Optional[torch.Generator] = None) -> Continuations:
    """Sample ``num_tokens`` tokens per row from ``state`` (whose last hidden is ``last_hidden`` [B,D])."""
    if num_tokens < 1:
        raise ValueError("num_tokens must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    toks, lps, hids = [], [], []
    with torch.no_grad():
        logits = model.lm_head(last_hidden)
        for _ in range(num_tokens):
            tok, lp = _pick(logits, temperature, top_p, generator)
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
                tok, _ = _pick(logits, temperature, top_p, generator)
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

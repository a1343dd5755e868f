"""Step 3 of REFINE: G continuations of k tokens from every cut of a document.

One sampler, :func:`sample_at_cuts`, serves every fast-weight caller: the rollout role's
engine (:class:`FastWeightRollout`) and the single-process step
(:class:`~refine_ray.refine.local_step.LocalRefineStep`). It starts from the cut states
(from the scoring pass with prefix sharing, or from a prefill of each prefix), decodes k
O(1) recurrent steps and returns the tokens, the behaviour log-probs (the learner's own
log-prob function, see :mod:`refine_ray.models.generation`) and the policy's hidden states
at the sampled tokens, which the policy-cosine reward needs.

Seeding (one rule for every backend, :func:`refine_ray.refine.seeding.sample_seed`): sample
g at the c-th cut of document d at step s draws its k uniforms from its own generator seeded
by (run seed, s, d, c, g); the token is picked by inverse CDF on them, vectorised over rows.
A decode batch holds the rows of ONE document only (offset-free models: all its cuts x G
samples; LaCT, whose state depends on its position: one cut's G samples), so neither the
draws nor the float results depend on which documents share a request or how many actors
there are. The vLLM backend (refine_ray.serving) keys its samples the same way.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from refine_ray.config import RefineConfig
from refine_ray.models.base import ModelState, offset_free_state
from refine_ray.models.generation import Continuations, prefill, sample_continuations
from refine_ray.refine.seeding import sample_seed


def continuation_seeds(run_seed: int, step: int, doc_id: int, n_cuts: int, samples_per_prefix: int) -> list[int]:
    """The ``n_cuts * G`` sample seeds of one document, row = cut_index * G + sample_index."""
    return [sample_seed(run_seed, step, doc_id, c, g) for c in range(n_cuts) for g in range(samples_per_prefix)]


def row_uniforms(seeds: Sequence[int], num_tokens: int) -> torch.Tensor:
    """``[len(seeds), num_tokens]`` float64 uniforms in [0, 1) on CPU, row r from its own
    generator seeded by ``seeds[r]`` (CPU draws: the same numbers on every device)."""
    out = torch.empty(len(seeds), num_tokens, dtype=torch.float64)
    for r, seed in enumerate(seeds):
        out[r] = torch.rand(num_tokens, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    return out


@torch.no_grad()
def sample_at_cuts(model, states: Sequence[ModelState], cut_hidden: torch.Tensor, num_tokens: int,
                   samples_per_prefix: int, temperature: float, top_p: float,
                   seeds: Sequence[int]) -> Continuations:
    """G continuations of ``num_tokens`` (k) tokens from each of one document's n cut states.

    Args:
        states: n batch-1 states, the model's state after ``ids[:cut]`` for each cut in cut order
            (their offsets are the cuts; offset-free models ignore them).
        cut_hidden: ``[n, D]`` last-layer hidden state at position cut-1 (it predicts the first
            continuation token); any float dtype, cast to the model's.
        samples_per_prefix: G. temperature / top_p: as in ``refine.temperature`` / ``refine.top_p``
            (temperature <= 0: greedy).
        seeds: ``n * G`` per-row seeds, row = cut_index * G + sample_index
            (:func:`continuation_seeds`).

    Returns:
        :class:`~refine_ray.models.generation.Continuations` with ``tokens [n*G, k]`` long,
        ``logprobs [n*G, k]`` float32 (log-prob of each sampled token under the full tempered
        distribution), ``hidden [n*G, k, D]`` (model dtype), rows cut-major then sample; its
        ``state`` is the last decode batch's (all rows for offset-free models).

    Raises:
        ValueError: when ``cut_hidden`` or ``seeds`` do not match the n states and G.
    """
    n, G = len(states), samples_per_prefix
    if n == 0 or cut_hidden.shape[0] != n:
        raise ValueError(f"sample_at_cuts: {n} cut states but cut_hidden has {cut_hidden.shape[0]} rows")
    if len(seeds) != n * G:
        raise ValueError(f"sample_at_cuts: {len(seeds)} seeds for {n} cuts x {G} samples")
    param = next(model.parameters())
    hidden = cut_hidden.to(device=param.device, dtype=param.dtype)
    uniforms = row_uniforms(seeds, num_tokens).to(param.device)
    if offset_free_state(model):     # offset-free states: every cut of the document in one decode batch
        groups = [(0, n, ModelState.cat([ModelState(s.layers, 0) for s in states]))]
    else:                   # states tied to their position: one cut at a time
        groups = [(j, j + 1, states[j]) for j in range(n)]
    parts = [sample_continuations(model, state.repeat_interleave(G), hidden[a:b].repeat_interleave(G, 0),
                                  num_tokens, temperature, top_p, uniforms=uniforms[a * G:b * G])
             for a, b, state in groups]
    if len(parts) == 1:
        return parts[0]
    return Continuations(torch.cat([p.tokens for p in parts]), torch.cat([p.logprobs for p in parts]),
                         torch.cat([p.hidden for p in parts]), parts[-1].state)


class FastWeightRollout:
    """The rollout role's engine for fast-weight models (DeltaNet, GatedDeltaNet, LaCT).

    Holds the policy (eval mode) and samples one document at a time with
    :func:`sample_at_cuts`, from the scorer's cut states (prefix sharing) or from a prefill
    of each prefix ``ids[:cut]`` (re-encode; one row at a time, so no padding enters a
    state). Seeds: ``(seed, step, doc_id, cut index, sample index)``, see the module docstring.
    Weights are loaded into ``model`` by the weight-sync backends (refine_ray.transport.weight_sync).
    """

    def __init__(self, model, cfg: RefineConfig, seed: int = 0):
        self.model = model.eval()
        self.cfg = cfg
        self.seed = seed
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def sample_document(self, ids: torch.Tensor, cuts: torch.Tensor, num_tokens: int, step: int, doc_id: int,
                        states: Optional[Sequence[ModelState]] = None,
                        cut_hidden: Optional[torch.Tensor] = None) -> Continuations:
        """G continuations of ``num_tokens`` tokens at each cut of document ``doc_id``.

        ``ids [L]`` long, ``cuts [n]`` prefix lengths; ``states`` (n batch-1 states) and
        ``cut_hidden [n, D]`` from the scoring pass, or None to prefill every prefix here.
        Returns rows ``cut * G + sample`` as in :func:`sample_at_cuts`.
        """
        if states is None:
            prefixes = [prefill(self.model, [ids[:c].to(self.device)]) for c in cuts.tolist()]
            states = [s for s, _ in prefixes]
            cut_hidden = torch.cat([h for _, h in prefixes])
        G = self.cfg.samples_per_prefix
        seeds = continuation_seeds(self.seed, step, doc_id, len(states), G)
        return sample_at_cuts(self.model, states, cut_hidden, num_tokens, G, self.cfg.temperature,
                              self.cfg.top_p, seeds)

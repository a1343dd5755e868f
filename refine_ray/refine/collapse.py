"""Collapse indicators: does a rise in reward come from prediction or from collapse?

REFINE's paper reward (cosine between the policy's own hidden states at the sampled and at the
true tokens) can be raised without predicting anything: make every hidden state point the same
way (representation collapse) or sample one token everywhere (policy collapse). Issue 15's first
probe saw both under PG-only training. Three numbers, logged beside every reward:

* ``collapse/hidden_pair_cosine``: mean cosine of last-layer hidden states at *unrelated*
  positions (fixed pairs from different documents, or far apart in one). It rises towards 1
  when the representation collapses; a healthy LM keeps it well below (measured on the tiny
  DeltaNet: ~0.4 at init).
* ``collapse/cut_entropy``: mean entropy (nats) of the next-token prediction at the cuts;
  near 0 means the sampler has become (near-)deterministic there.
* ``collapse/distinct_token_frac``: distinct sampled tokens / sampled tokens of a step;
  ``1/N`` when every sample is the same token.

Pure tensor functions (no model); the callers give them the hidden states they already have.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def unrelated_position_pairs(lengths: Sequence[int], num_pairs: int = 64, seed: int = 0,
                             min_prefix: int = 0) -> torch.Tensor:
    """``[P, 4]`` long rows ``(doc_a, pos_a, doc_b, pos_b)`` of fixed, unrelated position pairs.

    With two or more documents every pair joins two different documents; with one, the two
    positions are at least half the usable length apart. Positions are ``>= min_prefix``
    (the first tokens of a document are all near the initial state). Drawn from a CPU
    generator seeded by ``seed``: the same pairs for the same lengths at every step.
    Raises ValueError when no document has more than ``min_prefix + 1`` tokens.
    """
    docs = [i for i, n in enumerate(lengths) if n > min_prefix + 1]
    if not docs:
        raise ValueError(f"unrelated_position_pairs: no document longer than min_prefix+1={min_prefix + 1} tokens")
    gen = torch.Generator().manual_seed(seed)

    def pick(n: int, lo: int, hi: int) -> torch.Tensor:      # n positions in [lo, hi)
        return lo + (torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo)).long()

    if len(docs) >= 2:
        d = torch.tensor(docs)
        a = d[torch.randint(len(docs), (num_pairs,), generator=gen)]
        shift = torch.randint(1, len(docs), (num_pairs,), generator=gen)   # b != a
        b = d[(torch.searchsorted(d, a) + shift) % len(docs)]
        pos_a = torch.stack([pick(1, min_prefix, lengths[int(x)])[0] for x in a])
        pos_b = torch.stack([pick(1, min_prefix, lengths[int(x)])[0] for x in b])
        return torch.stack([a, pos_a, b, pos_b], 1)
    doc, n = docs[0], lengths[docs[0]]
    half = (n - min_prefix) // 2
    pos_a = pick(num_pairs, min_prefix, n - half)
    pos_b = pos_a + half
    a = torch.full((num_pairs,), doc)
    return torch.stack([a, pos_a, a, pos_b], 1)


def hidden_pair_cosine(hidden: Sequence[torch.Tensor], pairs: torch.Tensor) -> float:
    """Mean cosine over ``pairs [P, 4]`` (from :func:`unrelated_position_pairs`) of the hidden
    states ``hidden[doc] [L_doc, D]`` (any float dtype; computed in float32). In [-1, 1];
    1.0 when all hidden states are identical (full representation collapse)."""
    a = torch.stack([hidden[int(d)][int(p)] for d, p in pairs[:, :2].tolist()]).float()
    b = torch.stack([hidden[int(d)][int(p)] for d, p in pairs[:, 2:].tolist()]).float()
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def distinct_token_fraction(tokens: torch.Tensor) -> float:
    """Distinct values / number of values of ``tokens`` (any shape, long): 1/N when all N sampled
    tokens are the same (policy collapse), 1.0 when all differ. Raises ValueError when empty."""
    if tokens.numel() == 0:
        raise ValueError("distinct_token_fraction: no tokens")
    return torch.unique(tokens).numel() / tokens.numel()


def collapse_metrics(hidden: Sequence[torch.Tensor], pairs: torch.Tensor, cut_entropy: torch.Tensor,
                     sample_tokens: torch.Tensor) -> dict[str, float]:
    """The three indicators under their logged names: ``collapse/hidden_pair_cosine`` (of
    ``hidden`` at ``pairs``), ``collapse/cut_entropy`` (mean of ``cut_entropy`` [n], nats) and
    ``collapse/distinct_token_frac`` (of ``sample_tokens`` [N, k])."""
    return {"collapse/hidden_pair_cosine": hidden_pair_cosine(hidden, pairs),
            "collapse/cut_entropy": float(cut_entropy.float().mean()),
            "collapse/distinct_token_frac": distinct_token_fraction(sample_tokens)}

"""Collapse indicators: does a rise in reward come from prediction or from collapse?

REFINE's paper reward (cosine between the policy's own hidden states at the sampled and at the
true tokens) can be raised without predicting anything: make every hidden state point the same
way (representation collapse) or sample one token everywhere (policy collapse). Issue 15's first
probe saw both under PG-only training. Three numbers, logged beside every reward (training
steps: :func:`step_collapse_metrics`; fixed-cut evaluation: ``val/<name>``):

* ``collapse/hidden_pair_cosine``: mean cosine of last-layer hidden states at *unrelated*
  positions (fixed pairs from different documents, or far apart in one). It rises towards 1
  when the representation collapses; a healthy LM keeps it well below (measured on the tiny
  DeltaNet: ~0.4 at init).
* ``cut_entropy``: mean entropy (nats) of the next-token prediction at the cuts;
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
    Raises ValueError when fewer than two positions past ``min_prefix`` exist.
    """
    docs = [i for i, n in enumerate(lengths) if n > min_prefix]
    if not docs or (len(docs) == 1 and lengths[docs[0]] - min_prefix < 2):
        raise ValueError(f"unrelated_position_pairs: lengths {list(lengths)} leave fewer than 2 positions "
                         f"past min_prefix={min_prefix}")
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
    """The three indicators: ``hidden_pair_cosine`` (of ``hidden`` at ``pairs``), ``cut_entropy``
    (mean of ``cut_entropy`` [n], nats) and ``distinct_token_frac`` (of ``sample_tokens`` [N, k]).
    The callers add their prefix (training steps log ``collapse/hidden_pair_cosine``,
    ``cut_entropy``, ``collapse/distinct_token_frac``; the fixed-cut evaluation ``val/...``)."""
    return {"hidden_pair_cosine": hidden_pair_cosine(hidden, pairs),
            "cut_entropy": float(cut_entropy.float().mean()),
            "distinct_token_frac": distinct_token_fraction(sample_tokens)}


def step_collapse_metrics(true_hidden: torch.Tensor, cut_entropy: torch.Tensor, sample_tokens: torch.Tensor,
                          num_pairs: int = 64, seed: int = 0) -> dict[str, float]:
    """A training step's indicators from what the step already has (no extra forward pass).

    ``true_hidden [R, k, D]``: the policy's hidden states at the true continuations of the R
    cuts of the step (the scoring pass's ``gt_hidden``); pairs join different cuts (different
    documents, or cuts of one document, which lie in different chunks). ``cut_entropy [R]``
    nats; ``sample_tokens [N, k]`` long. Returns ``collapse/hidden_pair_cosine``,
    ``cut_entropy`` (its existing name) and ``collapse/distinct_token_frac``; the pair cosine
    is left out when the step has fewer than 2 cuts.
    """
    out = {"cut_entropy": float(cut_entropy.float().mean()),
           "collapse/distinct_token_frac": distinct_token_fraction(sample_tokens)}
    if true_hidden.shape[0] >= 2:
        rows = list(true_hidden)
        out["collapse/hidden_pair_cosine"] = hidden_pair_cosine(
            rows, unrelated_position_pairs([r.shape[0] for r in rows], num_pairs, seed))
    return out

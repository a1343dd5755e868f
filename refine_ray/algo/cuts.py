"""Entropy smoothing, cut sampling and ground-truth gathering for one document.

Alignment (deliberate; fixes upstream ReFINE). A *cut* ``c`` means: prefix =
``ids[:c]``, the continuation is generated in place of ``ids[c : c+k]``. The
predictive distributions of those k tokens sit at positions ``c-1 ... c+k-2``, so a
cut is scored by ``mean(entropy[c-1 : c+k-1])``. :func:`smooth_entropy` returns
``s[t] = mean(entropy[t : t+k])`` (forward window), indexed like ``entropy``, so the
score of cut ``c`` is ``s[c-1]`` (upstream ReFINE's "cut = t + 1"). Upstream ReFINE
instead averages a window *centred* on t (kernel k, or k+1 when k is even), which
is ~(k-1)/2 positions too early (2 for k=5).

Edges: windows running past the end are averaged over the positions that exist
(no zero pads counted). They never matter for valid cuts, which satisfy ``c+k <= L``.

Candidate range (deliberate; fixes upstream ReFINE). Valid cuts are exactly
``lo <= c <= hi`` with ``lo = max(min_prefix, 1)`` and ``hi = L - k``. These
``M = hi-lo+1`` candidates are split into ``n_chunks`` contiguous chunks of sizes
differing by at most one, and one cut is drawn per chunk. Upstream ReFINE instead
splits the real tokens into chunks of ``n_real // n`` (the tail after ``n*cs`` is
never chosen) and then *clamps* cuts to ``[start+20, S-20]``, which piles
probability mass on the clamp bounds. A document needs ``M >= n_chunks * k``
candidates (every chunk holds at least k), else :class:`DocumentTooShort`.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "CUT_STRATEGIES",
    "DocumentTooShort",
    "cut_range",
    "smooth_entropy",
    "sample_cuts",
    "gather_targets",
]

CUT_STRATEGIES = ("entropy", "uniform", "argmax", "argmin")


class DocumentTooShort(ValueError):
    """The document cannot host ``n_chunks`` cuts of k tokens after ``min_prefix``."""


def cut_range(length: int, n_chunks: int, k: int, min_prefix: int = 20) -> tuple[int, int]:
    """Inclusive range ``(lo, hi)`` of valid cuts; raises :class:`DocumentTooShort`.

    ``lo = max(min_prefix, 1)``, ``hi = length - k``; requires
    ``hi - lo + 1 >= n_chunks * k``, i.e. ``length >= lo + (n_chunks + 1) * k - 1``.
    """
    if n_chunks < 1 or k < 1:
        raise ValueError(f"n_chunks and k must be >= 1, got n_chunks={n_chunks}, k={k}")
    lo, hi = max(int(min_prefix), 1), int(length) - k
    if hi - lo + 1 < n_chunks * k:
        need = lo + (n_chunks + 1) * k - 1
        raise DocumentTooShort(
            f"document of {length} tokens is too short for {n_chunks} cuts of k={k} "
            f"with min_prefix={min_prefix}: needs >= {need} tokens"
        )
    return lo, hi


def smooth_entropy(entropy: torch.Tensor, k: int) -> torch.Tensor:
    """Forward moving average ``s[t] = mean(entropy[t : min(t+k, L)])``, shape ``[L]``.

    The score of cut ``c`` (continuation predicts ``ids[c:c+k]``) is ``s[c-1]``.
    k = 1 returns the entropy itself. Computed with a float64 cumulative sum.
    """
    if entropy.dim() != 1:
        raise ValueError(f"entropy must be 1-D [L], got {tuple(entropy.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    e = entropy.to(torch.float64)
    L = e.shape[0]
    if k == 1 or L == 0:
        return e.to(torch.float32)
    cs = torch.cat([e.new_zeros(1), torch.cumsum(e, 0)])
    t = torch.arange(L, device=e.device)
    end = torch.clamp(t + k, max=L)
    return ((cs[end] - cs[t]) / (end - t).to(torch.float64)).to(torch.float32)


def sample_cuts(
    entropy: torch.Tensor,
    n_chunks: int,
    k: int,
    strategy: str = "entropy",
    min_prefix: int = 20,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """One cut per chunk for a single unpadded document; ``LongTensor[n_chunks]``, ascending.

    ``entropy [L]`` comes from a forward over exactly the document's L tokens.
    Strategies over the candidates of a chunk (score of cut c = ``smooth_entropy[c-1]``):
    ``entropy``: sample from ``softmax(score / temperature)`` (upstream ReFINE: T = 1);
    ``uniform``: uniform; ``argmax`` / ``argmin``: deterministic, first on ties.
    Every cut satisfies ``max(min_prefix, 1) <= c`` and ``c + k <= L``. ``generator``
    must live on ``entropy``'s device.
    """
    if strategy not in CUT_STRATEGIES:
        raise ValueError(f"unknown cut strategy {strategy!r}; expected one of {CUT_STRATEGIES}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if entropy.dim() != 1:
        raise ValueError(f"entropy must be 1-D [L], got {tuple(entropy.shape)}")
    L = entropy.shape[0]
    lo, hi = cut_range(L, n_chunks, k, min_prefix)
    dev = entropy.device
    m = hi - lo + 1
    bounds = [lo + (j * m) // n_chunks for j in range(n_chunks + 1)]
    width = max(bounds[j + 1] - bounds[j] for j in range(n_chunks))
    starts = torch.tensor(bounds[:-1], device=dev)
    sizes = torch.tensor([bounds[j + 1] - bounds[j] for j in range(n_chunks)], device=dev)
    offs = torch.arange(width, device=dev)
    valid = offs[None, :] < sizes[:, None]  # [n, width]
    cand = torch.where(valid, starts[:, None] + offs[None, :], starts[:, None])  # cut values
    if strategy == "uniform":
        score = torch.zeros(cand.shape, device=dev)
    else:
        score = smooth_entropy(entropy, k)[cand - 1]
    if strategy == "argmin":
        pick = torch.where(valid, score, torch.full_like(score, float("inf"))).argmin(dim=1)
    elif strategy == "argmax":
        pick = torch.where(valid, score, torch.full_like(score, float("-inf"))).argmax(dim=1)
    else:
        logits = torch.where(valid, score / temperature, torch.full_like(score, float("-inf")))
        probs = torch.softmax(logits.double(), dim=1)
        pick = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return cand.gather(1, pick[:, None]).squeeze(1).long()


def gather_targets(
    ids: torch.Tensor, hidden: Optional[torch.Tensor], cuts: torch.Tensor, k: int
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Ground truth after each cut: ``gt_ids [n, k] = ids[c : c+k]``, ``gt_hidden [n, k, D]``.

    ``gt_hidden[j, i] = hidden[c_j + i]``: the last-layer state at the position whose
    *input* token is ``gt_ids[j, i]`` (from the full-document pass). Rewards compare it
    with the rollout's state at the position whose input is the i-th generated token,
    so the rollout must also run the k-th generated token through the model.
    ``hidden`` may be None (exact-match reward only); then ``gt_hidden`` is None.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D [L], got {tuple(ids.shape)}")
    cuts = torch.as_tensor(cuts, dtype=torch.long, device=ids.device).reshape(-1)
    L = ids.shape[0]
    if cuts.numel() and (int(cuts.min()) < 1 or int(cuts.max()) + k > L):
        raise ValueError(f"cuts {cuts.tolist()} out of range for L={L}, k={k}")
    idx = cuts[:, None] + torch.arange(k, device=ids.device)[None, :]
    gt_ids = ids[idx]
    if hidden is None:
        return gt_ids, None
    if hidden.shape[0] != L:
        raise ValueError(f"hidden has {hidden.shape[0]} positions, ids has {L}")
    return gt_ids, hidden[idx.to(hidden.device)]

"""GRPO outcome advantages, vectorised over groups.

Row layout used throughout refine-ray (as upstream ReFINE's interleaved repeat):
document-major, then cut, then sample: row ``(d * n_cuts + j) * G + g`` is sample g
of cut j of document d. Groups (upstream ReFINE's rule): with G = 1 a group is the n cuts
of one document (different prefixes); with G > 1 it is the G samples of one prefix.
"""
from __future__ import annotations

import torch

__all__ = ["make_group_ids", "grpo_advantages"]


def make_group_ids(num_docs: int, n_cuts: int, G: int) -> torch.Tensor:
    """``LongTensor[num_docs * n_cuts * G]`` of group ids for the row layout above.

    G = 1: ``id = d`` (one group of n_cuts rows per document).
    G > 1: ``id = d * n_cuts + j`` (one group of G rows per prefix).
    """
    if num_docs < 0 or n_cuts < 1 or G < 1:
        raise ValueError(f"bad sizes num_docs={num_docs}, n_cuts={n_cuts}, G={G}")
    prefix = torch.arange(num_docs * n_cuts, dtype=torch.long)
    if G == 1:
        return prefix // n_cuts
    return prefix.repeat_interleave(G)


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = 1e-6,
    normalize_std: bool = True,
    singleton: str = "reward",
) -> torch.Tensor:
    """Per-row GRPO advantage ``[N]``: ``(R - mean_g) / (std_g + eps)``, unbiased std.

    ``normalize_std=False`` gives ``R - mean_g`` (Dr.GRPO style).
    Groups with identical rewards get exactly 0 (checked with group max == min, so
    float rounding of the mean can never be amplified by ``1/eps``).
    Singleton groups (size 1): ``singleton="reward"`` gives ``A = R`` in both modes,
    as upstream ReFINE (verl uses mean 0, std 1, i.e. ``R / (1 + eps)``; we return R
    exactly); ``singleton="zero"`` gives ``A = 0`` (no baseline, no signal).
    Group ids may be any integers (not necessarily contiguous). Statistics are
    computed in float64; the result has ``rewards``' dtype.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N], got {tuple(rewards.shape)}, {tuple(group_ids.shape)}"
        )
    if singleton not in ("reward", "zero"):
        raise ValueError(f"singleton must be 'reward' or 'zero', got {singleton!r}")
    if rewards.numel() == 0:
        return rewards.clone()
    r = rewards.to(torch.float64)
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1
    zeros = r.new_zeros(n_groups)
    count = zeros.index_add(0, inv, torch.ones_like(r))
    mean = zeros.index_add(0, inv, r) / count
    diff = r - mean[inv]
    if normalize_std:
        var = zeros.index_add(0, inv, diff * diff) / (count - 1).clamp(min=1)
        adv = diff / (var.sqrt()[inv] + eps)
    else:
        adv = diff
    gmax = zeros.scatter_reduce(0, inv, r, reduce="amax", include_self=False)
    gmin = zeros.scatter_reduce(0, inv, r, reduce="amin", include_self=False)
    adv = torch.where((gmax == gmin)[inv], torch.zeros_like(adv), adv)
    single = (count == 1)[inv]
    adv = torch.where(single, r if singleton == "reward" else torch.zeros_like(r), adv)
    return adv.to(rewards.dtype)


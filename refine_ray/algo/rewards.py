"""Self-supervised rewards comparing a k-token continuation with the true next k tokens.

Shapes: N rollouts, k response positions, D hidden size. ``resp_hidden[j, i]`` is the
last-layer state at the position whose input is the i-th generated token;
``gt_hidden[j, i]`` the state at the position whose input is the i-th true token
(see :func:`refine_ray.algo.cuts.gather_targets`).

Optional ``mask [N, k]`` (1 = token was generated) for responses cut short by eos;
see :func:`response_mask_from_eos`. Deliberate decision: a missing position scores 0
and the mean still divides by k, so stopping early is never better than producing a
matching token. The reference always generates exactly k tokens (mask all ones), in
which case both conventions agree. All maths in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "REWARD_KINDS",
    "response_mask_from_eos",
    "cosine_reward",
    "exact_match_reward",
    "hybrid_reward",
    "canonical_reward_kind",
    "compute_reward",
    "place_at_last_token",
]

# canonical name -> accepted aliases (reference names: cosine_similarity, binary, hybrid)
REWARD_KINDS: dict[str, tuple[str, ...]] = {
    "cosine": ("cosine", "cosine_similarity", "cs"),
    "exact_match": ("exact_match", "binary", "em"),
    "hybrid": ("hybrid",),
}


def response_mask_from_eos(resp_ids: torch.Tensor, eos_id: int | list[int]) -> torch.Tensor:
    """``[N, k]`` long mask: 1 up to and including the first eos, 0 after (verl semantics)."""
    eos = torch.as_tensor(eos_id, device=resp_ids.device).reshape(-1)
    is_eos = torch.isin(resp_ids, eos).long()
    return ((is_eos.cumsum(dim=-1) - is_eos) == 0).long()


def _check_mask(mask: Optional[torch.Tensor], shape: torch.Size) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} != {tuple(shape)}")
    return mask.to(torch.float32)


def _mean_over_k(per_pos: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    m = _check_mask(mask, per_pos.shape)
    if m is not None:   # select, not multiply: a missing position may hold NaN (0 * NaN = NaN)
        per_pos = torch.where(m != 0, per_pos * m, torch.zeros((), dtype=per_pos.dtype, device=per_pos.device))
    return per_pos.sum(dim=-1) / per_pos.shape[-1]


def cosine_reward(
    resp_hidden: torch.Tensor,
    gt_hidden: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``[N]``: mean over the k positions of ``cos(resp_hidden[:, i], gt_hidden[:, i])``.

    Range [-1, 1]. A zero vector has cosine 0 (``F.cosine_similarity`` with ``eps``).
    """
    if resp_hidden.shape != gt_hidden.shape or resp_hidden.dim() != 3:
        raise ValueError(
            f"expected matching [N, k, D], got {tuple(resp_hidden.shape)} and {tuple(gt_hidden.shape)}"
        )
    cos = F.cosine_similarity(resp_hidden.float(), gt_hidden.float(), dim=-1, eps=eps)
    return _mean_over_k(cos, mask)


def exact_match_reward(
    resp_ids: torch.Tensor, gt_ids: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``[N]``: fraction of the k positions where ``resp_ids[:, i] == gt_ids[:, i]``."""
    if resp_ids.shape != gt_ids.shape or resp_ids.dim() != 2:
        raise ValueError(
            f"expected matching [N, k], got {tuple(resp_ids.shape)} and {tuple(gt_ids.shape)}"
        )
    return _mean_over_k((resp_ids == gt_ids).float(), mask)


def hybrid_reward(
    resp_ids: torch.Tensor,
    gt_ids: torch.Tensor,
    resp_hidden: torch.Tensor,
    gt_hidden: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[N]``: cosine + exact match (range [-1, 2]), as the reference."""
    return cosine_reward(resp_hidden, gt_hidden, mask) + exact_match_reward(resp_ids, gt_ids, mask)


def canonical_reward_kind(kind: str) -> str:
    for name, aliases in REWARD_KINDS.items():
        if kind in aliases:
            return name
    valid = sorted(a for aliases in REWARD_KINDS.values() for a in aliases)
    raise ValueError(f"unknown reward kind {kind!r}; expected one of {valid}")


def compute_reward(
    kind: str,
    *,
    resp_ids: Optional[torch.Tensor] = None,
    gt_ids: Optional[torch.Tensor] = None,
    resp_hidden: Optional[torch.Tensor] = None,
    gt_hidden: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dispatch on ``kind`` (see :data:`REWARD_KINDS`); raises ValueError on unknown kinds
    or missing inputs."""
    name = canonical_reward_kind(kind)
    need_ids = name in ("exact_match", "hybrid")
    need_hidden = name in ("cosine", "hybrid")
    if need_ids and (resp_ids is None or gt_ids is None):
        raise ValueError(f"reward {kind!r} needs resp_ids and gt_ids")
    if need_hidden and (resp_hidden is None or gt_hidden is None):
        raise ValueError(f"reward {kind!r} needs resp_hidden and gt_hidden")
    if name == "cosine":
        return cosine_reward(resp_hidden, gt_hidden, mask)
    if name == "exact_match":
        return exact_match_reward(resp_ids, gt_ids, mask)
    return hybrid_reward(resp_ids, gt_ids, resp_hidden, gt_hidden, mask)


def place_at_last_token(
    rewards: torch.Tensor, k: int, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``[N] -> [N, k]``: the scalar at the last response token, zeros elsewhere.

    With ``mask``, "last" is the last position with ``mask == 1``; a row with no valid
    position gets all zeros. Without it, position ``k-1`` (the reference).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got {tuple(rewards.shape)}")
    n = rewards.shape[0]
    out = torch.zeros(n, k, dtype=rewards.dtype, device=rewards.device)
    if mask is None:
        out[:, k - 1] = rewards
        return out
    m = _check_mask(mask, torch.Size((n, k))) > 0
    pos = torch.arange(k, device=rewards.device).expand(n, k)
    last = torch.where(m, pos, torch.full_like(pos, -1)).amax(dim=1)
    has = last >= 0
    rows = torch.arange(n, device=rewards.device)[has]
    out[rows, last[has]] = rewards[has]
    return out

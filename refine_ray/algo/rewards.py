"""Self-supervised rewards comparing a k-token continuation with the true next k tokens.

Shapes: N rollouts, k response positions, D hidden size. ``resp_hidden[j, i]`` is the
last-layer state at the position whose input is the i-th generated token;
``gt_hidden[j, i]`` the state at the position whose input is the i-th true token
(see :func:`refine_ray.algo.cuts.gather_targets`).

Every rollout holds exactly k tokens (the engines generate with eos ignored, as upstream
ReFINE), so a reward is a plain mean over the k positions: one scalar per rollout,
not a token-level reward. ``hybrid`` (upstream ReFINE) is the sum of the two, formed by
:mod:`refine_ray.refine.rewarding`. All maths in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cosine_reward", "exact_match_reward"]


def cosine_reward(resp_hidden: torch.Tensor, gt_hidden: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``float32 [N]``: mean over the k positions of ``cos(resp_hidden[:, i], gt_hidden[:, i])``.

    ``resp_hidden``, ``gt_hidden``: ``[N, k, D]``, any float dtype. Range [-1, 1]. A zero
    vector has cosine 0 (``F.cosine_similarity`` with ``eps``). Raises ValueError when the
    shapes differ or are not 3-D. Source: REFINE's cosine-similarity reward.
    """
    if resp_hidden.shape != gt_hidden.shape or resp_hidden.dim() != 3:
        raise ValueError(
            f"expected matching [N, k, D], got {tuple(resp_hidden.shape)} and {tuple(gt_hidden.shape)}"
        )
    cos = F.cosine_similarity(resp_hidden.float(), gt_hidden.float(), dim=-1, eps=eps)
    return cos.mean(dim=-1)


def exact_match_reward(resp_ids: torch.Tensor, gt_ids: torch.Tensor) -> torch.Tensor:
    """``float32 [N]``: fraction of the k positions where ``resp_ids[:, i] == gt_ids[:, i]``.

    ``resp_ids``, ``gt_ids``: integer ``[N, k]``. Raises ValueError when the shapes differ
    or are not 2-D. Source: REFINE's binary (exact-match) reward, per token.
    """
    if resp_ids.shape != gt_ids.shape or resp_ids.dim() != 2:
        raise ValueError(
            f"expected matching [N, k], got {tuple(resp_ids.shape)} and {tuple(gt_ids.shape)}"
        )
    return (resp_ids == gt_ids).float().mean(dim=-1)

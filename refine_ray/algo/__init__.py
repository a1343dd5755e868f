"""REFINE as pure tensor functions: entropy, cuts, rewards, GRPO advantages, losses.

No Ray, no model classes. See each module's docstring for the deliberate decisions
taken against the reference implementation.
"""
from refine_ray.algo.advantages import broadcast_advantages, grpo_advantages, make_group_ids
from refine_ray.algo.cuts import (
    CUT_STRATEGIES,
    CutPlan,
    DocumentTooShort,
    cut_range,
    gather_targets,
    plan_cuts,
    sample_cuts,
    smooth_entropy,
)
from refine_ray.algo.entropy import token_entropy, token_entropy_from_hidden
from refine_ray.algo.losses import (
    AGG_MODES,
    agg_loss,
    head_calls,
    kl_penalty,
    logprobs_from_logits,
    ntp_loss,
    ntp_loss_from_hidden,
    ppo_clip_loss,
    refine_loss,
)
from refine_ray.algo.rewards import (
    REWARD_KINDS,
    canonical_reward_kind,
    compute_reward,
    cosine_reward,
    exact_match_reward,
    hybrid_reward,
    place_at_last_token,
    response_mask_from_eos,
)

__all__ = [
    "AGG_MODES", "CUT_STRATEGIES", "REWARD_KINDS", "CutPlan", "DocumentTooShort",
    "agg_loss", "broadcast_advantages", "canonical_reward_kind", "compute_reward",
    "cosine_reward", "cut_range", "exact_match_reward", "gather_targets",
    "grpo_advantages", "head_calls", "hybrid_reward", "kl_penalty", "logprobs_from_logits",
    "make_group_ids", "ntp_loss", "ntp_loss_from_hidden", "place_at_last_token",
    "plan_cuts", "ppo_clip_loss", "refine_loss", "response_mask_from_eos",
    "sample_cuts", "smooth_entropy", "token_entropy", "token_entropy_from_hidden",
]

"""REFINE as pure tensor functions: entropy, cuts, rewards, GRPO advantages, losses.

No Ray, no model classes. See each module's docstring for the deliberate decisions
taken against upstream ReFINE.
"""
from refine_ray.algo.advantages import grpo_advantages, make_group_ids
from refine_ray.algo.cuts import (
    CUT_STRATEGIES,
    DocumentTooShort,
    cut_range,
    gather_targets,
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
    micro_batch_token_mean_weights,
    ntp_loss,
    ntp_loss_from_hidden,
    ppo_clip_loss,
    refine_loss,
)
from refine_ray.algo.rewards import cosine_reward, exact_match_reward

__all__ = [
    "AGG_MODES", "CUT_STRATEGIES", "DocumentTooShort",
    "agg_loss", "cosine_reward", "cut_range", "exact_match_reward", "gather_targets",
    "grpo_advantages", "head_calls", "kl_penalty", "logprobs_from_logits",
    "make_group_ids", "micro_batch_token_mean_weights", "ntp_loss", "ntp_loss_from_hidden", "ppo_clip_loss", "refine_loss",
    "sample_cuts", "smooth_entropy", "token_entropy", "token_entropy_from_hidden",
]

"""Reward role: self-supervised sequence rewards (policy hidden states, frozen encoder, exact match)."""
from __future__ import annotations

import time

import torch

from refine_ray.system.batches import RewardBatch, RolloutBatch, ScoredBatch
from refine_ray.config import RefineConfig, RewardConfig, TokenizerConfig
from refine_ray.data import load_tokenizer
from refine_ray.refine.rewarding import SequenceRewarder
from roles.common import setup_process


class RewardRole:
    """Scores every sampled continuation against the true next k tokens (REFINE's sequence reward)."""

    def __init__(self, refine: RefineConfig, tokenizer: TokenizerConfig, reward: RewardConfig, run_seed: int,
                 actor_index: int = 0):
        """``refine.reward``/``refine.reward_source`` choose the reward; ``tokenizer`` decodes tokens
        for the frozen encoder (``reward.encoder``); ``actor_index``: this actor's index in its group."""
        setup_process(run_seed + actor_index)
        # the frozen encoder runs on the GPU when the role was given one (reward.gpus_per_actor > 0)
        self.rewarder = SequenceRewarder(refine.reward, refine.reward_source,
                                         tokenizer=load_tokenizer(tokenizer.path), encoder_path=reward.encoder,
                                         encoder_device="cuda" if torch.cuda.is_available() else "cpu")

    def score(self, scored: ScoredBatch, rollout: RolloutBatch) -> RewardBatch:
        """Rewards of the rollout's samples against the scorer's true continuations (REFINE step 4):
        ``rewards [N]`` float32 and every computed component; ``compute_s`` in seconds. Raises
        ValueError when the policy-hidden reward gets a rollout without hidden states (vLLM)."""
        t0 = time.perf_counter()
        out = self.rewarder(torch.from_numpy(rollout.tokens), torch.from_numpy(scored.gt_ids),
                            None if rollout.hidden is None else torch.from_numpy(rollout.hidden),
                            torch.from_numpy(scored.gt_hidden))
        return RewardBatch(rewards=out.rewards.numpy(), components={k: v.numpy() for k, v in out.components.items()},
                           compute_s=time.perf_counter() - t0)

    def ping(self) -> bool:
        """Liveness probe used by the actor group."""
        return True

"""Reward role: self-supervised sequence rewards (reference-model or policy hidden states, frozen encoder,
exact match)."""
from __future__ import annotations

import time
from typing import Optional

import torch

from refine_ray.transport.batches import RewardBatch, RolloutBatch, ScoredBatch
from refine_ray.config import ModelConfig, RefineConfig, RewardConfig, TokenizerConfig
from refine_ray.data import load_tokenizer
from refine_ray.refine.frozen_reference import reference_hidden
from refine_ray.refine.policy import build_policy
from refine_ray.refine.rewarding import SequenceRewarder
from roles.common import Role, setup_process


class RewardRole(Role):
    """Scores every sampled continuation against the true next k tokens (REFINE's sequence reward)."""

    def __init__(self, refine: RefineConfig, tokenizer: TokenizerConfig, reward: RewardConfig, run_seed: int,
                 actor_index: int = 0, model: Optional[ModelConfig] = None, vocab_size: int = 0):
        """``refine.reward``/``refine.reward_source`` choose the reward; ``tokenizer`` decodes tokens
        for the frozen encoder (``reward.encoder``); ``actor_index``: this actor's index in its group;
        ``model``/``vocab_size``: the policy's section, built here as the reference model (the
        policy's initial weights; this role never receives weight syncs) for ``reward_source=frozen``.
        Raises ValueError when the frozen source gets no ``model``."""
        self.device = setup_process(run_seed + actor_index)
        self.refine, self.reference_model = refine, None
        if refine.reward_source == "frozen" and refine.reward != "exact":
            if model is None:
                raise ValueError("refine.reward_source=frozen: the reward role needs the model section")
            self.reference_model = build_policy(model, vocab_size, self.device).eval()
        # the frozen encoder runs on the GPU when the role was given one (reward.gpus_per_actor > 0)
        self.rewarder = SequenceRewarder(refine.reward, refine.reward_source,
                                         tokenizer=load_tokenizer(tokenizer.path), encoder_path=reward.encoder,
                                         encoder_device="cuda" if torch.cuda.is_available() else "cpu")

    def score(self, scored: ScoredBatch, rollout: RolloutBatch) -> RewardBatch:
        """Rewards of the rollout's samples against the scorer's true continuations (REFINE step 4):
        ``rewards [N]`` float32 and every computed component; ``compute_s`` in seconds. Raises
        ValueError when the policy-hidden reward gets a rollout without hidden states (vLLM)."""
        t0 = time.perf_counter()
        if self.reference_model is not None:   # both sides of the cosine from the reference model
            per_doc = scored.n_chunks * rollout.samples_per_prefix
            pairs = [reference_hidden(self.reference_model, torch.from_numpy(scored.docs.doc(d)),
                                      torch.from_numpy(scored.cuts[d]),
                                      torch.from_numpy(rollout.tokens[d * per_doc:(d + 1) * per_doc]),
                                      rollout.samples_per_prefix, self.refine.state_stride)
                     for d in range(len(scored.docs))]
            response_hidden, true_hidden = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        else:
            response_hidden = None if rollout.hidden is None else torch.from_numpy(rollout.hidden)
            true_hidden = torch.from_numpy(scored.gt_hidden)
        out = self.rewarder(torch.from_numpy(rollout.tokens), torch.from_numpy(scored.gt_ids),
                            response_hidden, true_hidden)
        return RewardBatch(rewards=out.rewards.numpy(), components={k: v.numpy() for k, v in out.components.items()},
                           compute_s=time.perf_counter() - t0)

"""Reward role: self-supervised sequence rewards (policy hidden states, frozen encoder, exact match)."""
from __future__ import annotations

import time

from refine_ray.system.batches import RewardBatch, RolloutBatch, ScoredBatch
from refine_ray.config import ExperimentConfig
from refine_ray.data import load_tokenizer
from refine_ray.refine.rewarding import SequenceRewarder
from roles.common import setup_process


class RewardRole:
    def __init__(self, cfg: ExperimentConfig, seed: int = 0):
        setup_process(cfg.train.seed + seed)
        self.rewarder = SequenceRewarder(cfg.refine.reward, cfg.refine.reward_source,
                                         tokenizer=load_tokenizer(cfg.tokenizer.path),
                                         encoder_path=cfg.reward.encoder)

    def score(self, scored: ScoredBatch, rollout: RolloutBatch) -> RewardBatch:
        t0 = time.perf_counter()
        out = self.rewarder(scored, rollout)
        out.compute_s = time.perf_counter() - t0
        return out

    def ping(self) -> bool:
        return True

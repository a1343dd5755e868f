"""Rollout role: G sampled continuations of k tokens per prefix, stamped with the weight version."""
from __future__ import annotations

import time

from refine_ray.system.batches import RolloutBatch, ScoredBatch
from refine_ray.config import ExperimentConfig
from refine_ray.data import load_tokenizer
from refine_ray.refine.policy import build_policy
from refine_ray.refine.sampling import FastWeightRollout
from roles.common import VersionedWeights, setup_process


class RolloutRole(VersionedWeights):
    def __init__(self, cfg: ExperimentConfig, seed: int = 0):
        self.device = setup_process(cfg.train.seed + seed)
        vocab = len(load_tokenizer(cfg.tokenizer.path))
        if cfg.rollout.backend == "vllm":
            from refine_ray.serving.vllm_rollout import VLLMRollout

            self.engine = VLLMRollout(cfg, vocab)
        else:
            self.engine = FastWeightRollout(build_policy(cfg.model, vocab, self.device), cfg.refine,
                                            seed=cfg.train.seed)

    def generate(self, batch: ScoredBatch) -> RolloutBatch:
        t0 = time.perf_counter()
        out = self.engine.generate(batch, self.version)
        out.compute_s = time.perf_counter() - t0
        return out

    def _load_weights(self, weights) -> None:
        self.engine.load_weights(weights)

    def _weight_module(self):
        return self.engine.model

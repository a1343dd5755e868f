"""Rollout role: G sampled continuations of k tokens per prefix, stamped with the weight version."""
from __future__ import annotations

import time

from refine_ray.config import DataConfig, ModelConfig, RefineConfig, RolloutConfig, SystemConfig
from refine_ray.serving.rollout_engine import make_rollout_engine
from refine_ray.transport.batches import RolloutBatch, ScoredBatch
from roles.common import VersionedWeights, setup_process


class RolloutRole(VersionedWeights):
    """Samples G continuations of k tokens at every cut with the engine ``rollout.backend`` names."""

    def __init__(self, model: ModelConfig, data: DataConfig, refine: RefineConfig, rollout: RolloutConfig,
                 system: SystemConfig, vocab_size: int, run_seed: int, actor_index: int = 0):
        """``run_seed``: ``train.seed`` (keys the samples, with step, document, cut and sample
        index); ``actor_index``: this actor's index in its group (never enters a sample's seed).
        ``data.max_length`` sizes vLLM's context; ``system`` chooses the weight-sync receiver."""
        self.init_weight_sync(system, model.dtype)
        self.engine = make_rollout_engine(model, refine, rollout, data.max_length, vocab_size, run_seed,
                                          setup_process(run_seed + actor_index))

    def generate(self, batch: ScoredBatch) -> RolloutBatch:
        """G continuations of k tokens at every cut of ``batch`` (REFINE step 3), stamped with the
        weight version used (:meth:`refine_ray.serving.rollout_engine.RolloutEngine.generate`);
        ``compute_s`` in seconds."""
        t0 = time.perf_counter()
        out = self.engine.generate(batch, self.version)
        out.compute_s = time.perf_counter() - t0
        return out

    def weight_target(self):
        return self.engine.weight_target()

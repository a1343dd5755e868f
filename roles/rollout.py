"""Rollout role: G sampled continuations of k tokens per prefix, stamped with the weight version."""
from __future__ import annotations

import time

import torch

from refine_ray.system.batches import RolloutBatch, ScoredBatch, unpack_states
from refine_ray.config import DataConfig, ModelConfig, RefineConfig, RolloutConfig
from refine_ray.refine.policy import build_policy
from refine_ray.refine.sampling import FastWeightRollout
from roles.common import VersionedWeights, setup_process


class RolloutRole(VersionedWeights):
    """Samples G continuations of k tokens at every cut with the fast-weight engine or vLLM."""

    def __init__(self, model: ModelConfig, data: DataConfig, refine: RefineConfig, rollout: RolloutConfig,
                 vocab_size: int, run_seed: int, actor_index: int = 0):
        """``run_seed``: ``train.seed`` (keys the samples, with step, document, cut and sample
        index); ``actor_index``: this actor's index in its group (never enters a sample's seed).
        ``data`` is read by the vLLM backend only (its context length)."""
        self.device = setup_process(run_seed + actor_index)
        if rollout.backend == "vllm":
            from refine_ray.config import ExperimentConfig, TrainConfig
            from refine_ray.serving.vllm_rollout import VLLMRollout

            # VLLMRollout (refine_ray.serving) still reads its sections from an ExperimentConfig
            parts = ExperimentConfig(model=model, data=data, refine=refine, rollout=rollout,
                                     train=TrainConfig(seed=run_seed))
            self.engine = VLLMRollout(parts, vocab_size)
        else:
            self.engine = FastWeightRollout(build_policy(model, vocab_size, self.device), refine, seed=run_seed)

    def generate(self, batch: ScoredBatch) -> RolloutBatch:
        """G continuations of k tokens at every cut of ``batch`` (REFINE step 3), stamped with the
        weight version used. Fast-weight engine: one :meth:`FastWeightRollout.sample_document` per
        document (from the scorer's cut states, or prefilling each prefix without prefix sharing),
        seeds keyed by (``train.seed``, ``batch.step``, document id, cut index, sample index), so
        the samples do not depend on how documents are split over actors or requests. vLLM: its
        own ``generate`` (no hidden states). Rows ``(doc * n + cut) * G + sample``; ``compute_s``
        in seconds."""
        t0 = time.perf_counter()
        if isinstance(self.engine, FastWeightRollout):
            states = None if batch.cut_states is None else unpack_states(batch.cut_states, self.engine.device)
            hidden = None if batch.cut_hidden is None else torch.from_numpy(batch.cut_hidden)
            parts = []
            for d in range(len(batch.docs)):
                rows = batch.document_rows(d)
                parts.append(self.engine.sample_document(
                    torch.from_numpy(batch.docs.doc(d)), torch.from_numpy(batch.cuts[d]), batch.k, batch.step,
                    int(batch.docs.doc_ids[d]), None if states is None else states[rows],
                    None if hidden is None else hidden[rows]))
            out = RolloutBatch.from_continuations(parts, self.version, self.engine.cfg.samples_per_prefix)
        else:
            out = self.engine.generate(batch, self.version)
        out.compute_s = time.perf_counter() - t0
        return out

    def _load_weights(self, weights) -> None:
        if isinstance(self.engine, FastWeightRollout):    # the object-store backend loads its module
            super()._load_weights(weights)
        else:                                   # vLLM reloads from a file of the same tensor set
            self.engine.load_weights(weights)

    def _weight_module(self):
        return self.engine.model         # the fast-weight engine's policy (the collective backend)

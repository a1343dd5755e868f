"""The rollout engines' one interface (REFINE step 3 on transport batches) and the fast-weight engine.

An engine takes a :class:`~refine_ray.transport.batches.ScoredBatch` (documents, cuts and, with
prefix sharing, the scorer's cut states) and returns a
:class:`~refine_ray.transport.batches.RolloutBatch` of G continuations of k tokens per cut,
rows ``(doc * n + cut) * G + sample``, stamped with the weight version used. Two engines:
:class:`FastWeightEngine` (our cached-state sampler, every model type) and
:class:`~refine_ray.serving.vllm_rollout.VLLMRollout` (vLLM, the types it serves);
:func:`make_rollout_engine` picks one by ``rollout.backend``.
"""
from __future__ import annotations

import torch

from refine_ray.config import ModelConfig, RefineConfig, RolloutConfig
from refine_ray.refine.policy import build_policy
from refine_ray.refine.sampling import FastWeightRollout
from refine_ray.transport.batches import RolloutBatch, ScoredBatch, unpack_states


class RolloutEngine:
    """Interface: sample a batch's continuations; expose what weight sync loads into."""

    def generate(self, batch: ScoredBatch, version: int) -> RolloutBatch:
        """G continuations of ``batch.k`` tokens at every cut of ``batch``, stamped ``version``."""
        raise NotImplementedError

    def weight_target(self):
        """The module the weight-sync receivers load into, or an object with ``load_weights(dict)``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine's resources (processes, files); nothing by default."""


class FastWeightEngine(RolloutEngine):
    """Our cached-state sampler (:class:`refine_ray.refine.sampling.FastWeightRollout`) on batches."""

    def __init__(self, model: ModelConfig, refine: RefineConfig, vocab_size: int, seed: int, device: torch.device):
        """The policy built from ``model`` on ``device``; ``seed``: ``train.seed`` (keys the samples)."""
        self.sampler = FastWeightRollout(build_policy(model, vocab_size, device), refine, seed=seed)

    def generate(self, batch: ScoredBatch, version: int) -> RolloutBatch:
        """One :meth:`FastWeightRollout.sample_document` per document, from the scorer's cut states
        (prefix sharing) or prefilling each prefix; seeds keyed by (``train.seed``, ``batch.step``,
        document id, cut index, sample index), so the samples do not depend on how documents are
        split over actors or requests. With hidden states (``RolloutBatch.hidden``). The batch's cut
        states stay in host memory; one document's at a time go to the model's device."""
        states = None if batch.cut_states is None else unpack_states(batch.cut_states)
        hidden = None if batch.cut_hidden is None else torch.from_numpy(batch.cut_hidden)
        parts = []
        for d in range(len(batch.docs)):
            rows = batch.document_rows(d)
            parts.append(self.sampler.sample_document(
                torch.from_numpy(batch.docs.doc(d)), torch.from_numpy(batch.cuts[d]), batch.k, batch.step,
                int(batch.docs.doc_ids[d]),
                None if states is None else [s.to(self.sampler.device) for s in states[rows]],
                None if hidden is None else hidden[rows]))
        return RolloutBatch.from_continuations(parts, version, self.sampler.cfg.samples_per_prefix)

    def weight_target(self) -> torch.nn.Module:
        return self.sampler.model


def make_rollout_engine(model: ModelConfig, refine: RefineConfig, rollout: RolloutConfig, max_length: int,
                        vocab_size: int, seed: int, device: torch.device) -> RolloutEngine:
    """The engine ``rollout.backend`` names (``fast_weight`` | ``vllm``; vLLM imported only then).
    ``max_length``: ``data.max_length`` (vLLM's context); ``seed``: ``train.seed``."""
    if rollout.backend == "vllm":
        from refine_ray.serving.vllm_rollout import VLLMRollout

        return VLLMRollout(model, refine, max_length, vocab_size, seed)
    return FastWeightEngine(model, refine, vocab_size, seed, device)

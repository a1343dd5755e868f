"""Reference role: log-probs of the sampled continuations under the reference model (the frozen initial
policy), for the KL term."""
from __future__ import annotations

import numpy as np
import torch

from refine_ray.transport.batches import RolloutBatch, ScoredBatch
from refine_ray.config import ModelConfig, RefineConfig
from refine_ray.refine.policy import build_policy
from refine_ray.refine.sequence_logprobs import document_logprobs
from roles.common import Role, setup_process


class ReferenceRole(Role):
    """The frozen initial policy: log-probs of the sampled continuations for the KL penalty."""

    def __init__(self, model: ModelConfig, refine: RefineConfig, vocab_size: int, run_seed: int,
                 actor_index: int = 0):
        """``model``: the policy's section (the reference model is the policy at version 0);
        ``actor_index``: this actor's index in its group."""
        self.device = setup_process(run_seed + actor_index)
        self.refine = refine
        self.model = build_policy(model, vocab_size, self.device).eval()

    @torch.no_grad()
    def logprobs(self, scored: ScoredBatch, rollout: RolloutBatch) -> np.ndarray:
        """``[N, k]`` float32 log-probs of the rollout's samples under the frozen initial policy
        (:func:`refine_ray.refine.sequence_logprobs.document_logprobs`, no grad), rows as the rollout's."""
        G = rollout.samples_per_prefix
        per_doc = scored.n_chunks * G
        out = []
        for d in range(len(scored.docs)):
            ids = torch.from_numpy(scored.docs.doc(d)).to(self.device)
            resp = torch.from_numpy(rollout.tokens[d * per_doc:(d + 1) * per_doc]).to(self.device)
            res = document_logprobs(self.model, ids, torch.from_numpy(scored.cuts[d]), resp, G,
                                    self.refine.temperature, shared=self.refine.prefix_sharing,
                                    with_ntp=False)
            out.append(res.logprobs.float().cpu().numpy())
        return np.concatenate(out)

"""Reference role: log-probs of the sampled continuations under the frozen initial policy (KL term)."""
from __future__ import annotations

import numpy as np
import torch

from refine_ray.system.batches import RolloutBatch, ScoredBatch
from refine_ray.config import ExperimentConfig
from refine_ray.data import load_tokenizer
from refine_ray.refine.policy import build_policy
from refine_ray.refine.sequence_logprobs import document_logprobs
from roles.common import setup_process


class ReferenceRole:
    def __init__(self, cfg: ExperimentConfig, seed: int = 0):
        self.device = setup_process(cfg.train.seed + seed)
        self.cfg = cfg
        self.model = build_policy(cfg.model, len(load_tokenizer(cfg.tokenizer.path)), self.device).eval()

    @torch.no_grad()
    def logprobs(self, scored: ScoredBatch, rollout: RolloutBatch) -> np.ndarray:
        G = rollout.samples_per_prefix
        per_doc = scored.n_chunks * G
        out = []
        for d in range(len(scored.docs)):
            ids = torch.from_numpy(scored.docs.doc(d)).to(self.device)
            resp = torch.from_numpy(rollout.tokens[d * per_doc:(d + 1) * per_doc]).to(self.device)
            res = document_logprobs(self.model, ids, torch.from_numpy(scored.cuts[d]), resp, G,
                                    self.cfg.refine.temperature, shared=self.cfg.refine.prefix_sharing,
                                    with_ntp=False)
            out.append(res.logprobs.float().cpu().numpy())
        return np.concatenate(out)

    def ping(self) -> bool:
        return True

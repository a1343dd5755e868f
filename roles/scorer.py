"""Data + entropy scorer role: reads and tokenises the corpus, scores documents, picks cuts."""
from __future__ import annotations

import numpy as np
import torch

from refine_ray.batches import DocBatch, ScoredBatch
from refine_ray.config import ExperimentConfig
from refine_ray.data import DocumentStream, load_tokenizer
from refine_ray.policy import build_policy
from refine_ray.scoring import min_document_tokens, pack_states, score_document
from roles.common import VersionedWeights, setup_process


class ScorerRole(VersionedWeights):
    def __init__(self, cfg: ExperimentConfig, seed: int = 0, shard: int = 0, num_shards: int = 1):
        self.device = setup_process(cfg.train.seed + seed)
        self.cfg = cfg
        tokenizer = load_tokenizer(cfg.tokenizer.path)
        self.stream = DocumentStream(cfg.data, tokenizer, min_tokens=min_document_tokens(cfg.refine),
                                     shard=shard, num_shards=num_shards)
        self.model = build_policy(cfg.model, len(tokenizer), self.device).eval()
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed + 1000 + seed)

    def next_batch(self, size: int) -> ScoredBatch:
        """Score the next ``size`` usable documents with the current weights."""
        docs = self.stream.next_batch(size)
        return self.score(DocBatch.from_lists([d.doc_id for d in docs], [d.ids for d in docs]))

    def score(self, docs: DocBatch) -> ScoredBatch:
        """Score given documents (also used to regenerate a stale batch on the same documents)."""
        with_states = self.cfg.refine.prefix_sharing
        cuts, gt_ids, gt_hidden, entropy, cut_hidden, states = [], [], [], [], [], []
        for i in range(len(docs)):
            ids = torch.from_numpy(docs.doc(i)).to(self.device)
            s = score_document(self.model, ids, self.cfg.refine, self.generator, with_states=with_states)
            cuts.append(s.cuts.cpu().numpy())
            gt_ids.append(s.gt_ids.cpu().numpy())
            gt_hidden.append(s.gt_hidden.cpu().numpy())
            entropy.append(s.cut_entropy.float().cpu().numpy())
            cut_hidden.append(s.cut_hidden.cpu().numpy())
            if with_states:
                states.extend(s.cut_states)
        return ScoredBatch(
            docs=docs,
            cuts=np.stack(cuts), gt_ids=np.concatenate(gt_ids), gt_hidden=np.concatenate(gt_hidden),
            cut_entropy=np.concatenate(entropy), version=self.version, skipped=self.stream.skipped,
            cut_hidden=np.concatenate(cut_hidden) if with_states else None,
            cut_states=pack_states(states) if with_states else None)

    def data_state(self) -> dict:
        return {"stream": self.stream.state_dict(), "generator": self.generator.get_state()}

    def load_data_state(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.generator.set_state(state["generator"])

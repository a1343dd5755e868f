"""Data + entropy scorer role: tokenises the rows it is given, scores them, picks cuts.

The driver owns the data position (a :class:`~refine_ray.data.DataCursor`); a scorer
holds the corpus and the current weights only, so a restarted scorer can redo
any request. Cut sampling is seeded by (run seed, step, document): a redone
request picks the same cuts.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from refine_ray.system.batches import DocBatch, ScoredBatch
from refine_ray.config import ExperimentConfig
from refine_ray.data import Corpus, load_tokenizer
from refine_ray.refine.seeding import cut_seed
from refine_ray.refine.policy import build_policy
from refine_ray.refine.scoring import pack_states, score_document
from roles.common import VersionedWeights, setup_process


class ScorerRole(VersionedWeights):
    def __init__(self, cfg: ExperimentConfig, seed: int = 0):
        self.device = setup_process(cfg.train.seed + seed)
        self.cfg = cfg
        tokenizer = load_tokenizer(cfg.tokenizer.path)
        self.corpus = Corpus(cfg.data, tokenizer)
        self.model = build_policy(cfg.model, len(tokenizer), self.device).eval()

    def lengths(self) -> np.ndarray:
        return self.corpus.lengths()

    def score_rows(self, rows: list[int], step: int) -> ScoredBatch:
        docs = [self.corpus.document(r) for r in rows]
        scored = self.score(DocBatch.from_lists(rows, [d.ids for d in docs]), step)
        if self.cfg.data.answer_column is not None:
            scored.answers = DocBatch.from_lists(rows, [d.answer_ids for d in docs])
        return scored

    def score(self, docs: DocBatch, step: int) -> ScoredBatch:
        """Score documents with the current weights and choose their cuts."""
        t0 = time.perf_counter()
        with_states = self.cfg.refine.prefix_sharing
        cuts, gt_ids, gt_hidden, entropy, cut_hidden, states = [], [], [], [], [], []
        for i in range(len(docs)):
            ids = torch.from_numpy(docs.doc(i)).to(self.device)
            gen = torch.Generator(device=self.device).manual_seed(
                cut_seed(self.cfg.train.seed, step, int(docs.doc_ids[i])))
            s = score_document(self.model, ids, self.cfg.refine, gen, with_states=with_states,
                               state_stride=self.cfg.refine.state_stride)
            cuts.append(s.cuts.cpu().numpy())
            gt_ids.append(s.gt_ids.cpu().numpy())
            gt_hidden.append(s.gt_hidden.cpu().numpy())
            entropy.append(s.cut_entropy.float().cpu().numpy())
            cut_hidden.append(s.cut_hidden.cpu().numpy())
            if with_states:
                states.extend(s.cut_states)
        return ScoredBatch(
            docs=docs, cuts=np.stack(cuts), gt_ids=np.concatenate(gt_ids), gt_hidden=np.concatenate(gt_hidden),
            cut_entropy=np.concatenate(entropy), version=self.version, step=step,
            cut_hidden=np.concatenate(cut_hidden) if with_states else None,
            cut_states=pack_states(states) if with_states else None, compute_s=time.perf_counter() - t0)

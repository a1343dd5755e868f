"""The batches that travel between roles through the Ray object store.

Every field is a contiguous numpy array (Ray ships those out of band, zero
copy), never a pickled list of tensors. Ragged documents are one flat token
array plus offsets. Row order of everything per-sample is fixed:
``row = (doc * n_chunks + cut) * G + sample``; ``prefix = row // G``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class DocBatch:
    doc_ids: np.ndarray          # [B] corpus row index
    tokens: np.ndarray           # [sum L] int64
    offsets: np.ndarray          # [B+1]

    @staticmethod
    def from_lists(doc_ids: list[int], docs: list[np.ndarray]) -> "DocBatch":
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(d) for d in docs])
        tokens = np.concatenate(docs).astype(np.int64) if docs else np.zeros(0, np.int64)
        return DocBatch(np.asarray(doc_ids, dtype=np.int64), tokens, offsets)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def select(self, rows: list[int]) -> "DocBatch":
        return DocBatch.from_lists([int(self.doc_ids[r]) for r in rows], [self.doc(r) for r in rows])


@dataclass
class ScoredBatch:
    """Scorer output: documents, their cuts and the ground truth at each cut."""

    docs: DocBatch
    cuts: np.ndarray             # [B, n] prefix lengths (prefix = ids[:cut])
    gt_ids: np.ndarray           # [B*n, k] true next k tokens
    gt_hidden: np.ndarray        # [B*n, k, D] full-pass hidden at the positions whose input is gt_ids
    cut_entropy: np.ndarray      # [B*n] entropy of the prediction of the first continuation token
    version: int                 # policy weight version used for scoring
    step: int = 0                # training step (keys the sampling seeds)
    compute_s: float = 0.0       # scorer time spent on this batch
    answers: Optional[DocBatch] = None   # task answer tokens per document (post-training)
    cut_hidden: Optional[np.ndarray] = None       # [B*n, D] hidden at cut-1 (prefix sharing)
    cut_states: Optional[dict[str, np.ndarray]] = None  # scoring.pack_states of the B*n cut states

    @property
    def n_chunks(self) -> int:
        return int(self.cuts.shape[1])

    @property
    def k(self) -> int:
        return int(self.gt_ids.shape[1])


@dataclass
class RolloutBatch:
    tokens: np.ndarray           # [N, k] sampled continuations
    logprobs: np.ndarray         # [N, k] behaviour log-probs at sampling time
    versions: np.ndarray         # [N] weight version that produced each sample
    hidden: Optional[np.ndarray] = None  # [N, k, D] policy hidden at the sampled tokens (None for vLLM)
    samples_per_prefix: int = 1
    compute_s: float = 0.0


@dataclass
class RewardBatch:
    rewards: np.ndarray          # [N] the configured reward
    components: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. cosine, exact, [N] each
    compute_s: float = 0.0


@dataclass
class LearnBatch:
    """Everything a learner rank needs for its documents."""

    docs: DocBatch
    cuts: np.ndarray             # [B, n]
    responses: np.ndarray        # [B*n*G, k]
    old_logprobs: np.ndarray     # [B*n*G, k]
    advantages: np.ndarray       # [B*n*G]
    versions: np.ndarray         # [B*n*G]
    samples_per_prefix: int
    ref_logprobs: Optional[np.ndarray] = None
    answers: Optional[DocBatch] = None   # task SFT targets (post-training)

    def shard(self, rank: int, world: int) -> "LearnBatch":
        """Documents rank::world go to ``rank`` (documents never split across ranks)."""
        docs = list(range(rank, len(self.docs), world))
        per_doc = self.cuts.shape[1] * self.samples_per_prefix
        rows = np.concatenate([np.arange(d * per_doc, (d + 1) * per_doc) for d in docs]) if docs else np.zeros(0, np.int64)
        return LearnBatch(
            docs=self.docs.select(docs), cuts=self.cuts[docs], responses=self.responses[rows],
            old_logprobs=self.old_logprobs[rows], advantages=self.advantages[rows],
            versions=self.versions[rows], samples_per_prefix=self.samples_per_prefix,
            ref_logprobs=None if self.ref_logprobs is None else self.ref_logprobs[rows],
            answers=None if self.answers is None else self.answers.select(docs))

"""The batches that travel between roles through the Ray object store.

Every field is a contiguous numpy array (Ray ships those out of band, zero
copy), never a pickled list of tensors. Ragged documents are one flat token
array plus offsets. Row order of everything per-sample is fixed:
``row = (doc * n_chunks + cut) * G + sample``; ``prefix = row // G``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from refine_ray.models.base import ModelState


@dataclass
class DocBatch:
    """Ragged documents as one flat int64 token array plus offsets (document i is
    ``tokens[offsets[i]:offsets[i+1]]``)."""

    doc_ids: np.ndarray          # [B] corpus row index
    tokens: np.ndarray           # [sum L] int64
    offsets: np.ndarray          # [B+1]

    @staticmethod
    def from_lists(doc_ids: list[int], docs: list[np.ndarray]) -> "DocBatch":
        """Pack 1-D token arrays (any integer dtype) with their corpus ids."""
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(d) for d in docs])
        tokens = np.concatenate(docs).astype(np.int64) if docs else np.zeros(0, np.int64)
        return DocBatch(np.asarray(doc_ids, dtype=np.int64), tokens, offsets)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (a view, int64)."""
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def select(self, rows: list[int]) -> "DocBatch":
        """A new batch of documents ``rows`` (indices into this batch), in that order."""
        return DocBatch.from_lists([int(self.doc_ids[r]) for r in rows], [self.doc(r) for r in rows])


@dataclass
class ScoredBatch:
    """Scorer output: documents, their cuts and the ground truth at each cut."""

    docs: DocBatch
    cuts: np.ndarray             # [B, n] prefix lengths (prefix = ids[:cut])
    gt_ids: np.ndarray           # [B*n, k] true next k tokens
    gt_hidden: np.ndarray        # [B*n, k, D] full-pass hidden at the positions whose input is gt_ids
    cut_entropy: np.ndarray      # [B*n] entropy of the prediction of the first continuation token
    step: int = 0                # training step (keys the sampling seeds)
    compute_s: float = 0.0       # scorer time spent on this batch
    answers: Optional[DocBatch] = None   # task answer tokens per document (post-training)
    cut_hidden: Optional[np.ndarray] = None       # [B*n, D] hidden at cut-1 (prefix sharing)
    cut_states: Optional[dict[str, np.ndarray]] = None  # pack_states of the B*n cut states

    @staticmethod
    def from_scores(docs: DocBatch, scores: Sequence, step: int, compute_s: float = 0.0) -> "ScoredBatch":
        """The transport form of per-document :class:`~refine_ray.refine.scoring.DocumentScore` s
        (one per document of ``docs``, in order): numpy, float32 hidden states; cut states and
        cut hidden states travel when the scores carry cut states (prefix sharing)."""
        def cat(name: str) -> np.ndarray:  # one field of every score, numpy (float32 when floating)
            return np.concatenate([getattr(s, name).float().cpu().numpy() if getattr(s, name).is_floating_point()
                                   else getattr(s, name).cpu().numpy() for s in scores])

        with_states = bool(scores) and scores[0].cut_states is not None
        return ScoredBatch(
            docs=docs, cuts=np.stack([s.cuts.cpu().numpy() for s in scores]), gt_ids=cat("gt_ids"),
            gt_hidden=cat("gt_hidden"), cut_entropy=cat("cut_entropy"), step=step, compute_s=compute_s,
            cut_hidden=cat("cut_hidden") if with_states else None,
            cut_states=pack_states([st for s in scores for st in s.cut_states]) if with_states else None)

    def document_rows(self, d: int) -> slice:
        """The prefix rows (of ``gt_ids``, ``cut_hidden``, cut states) of document ``d``."""
        return slice(d * self.n_chunks, (d + 1) * self.n_chunks)

    @property
    def n_chunks(self) -> int:
        """n: cuts per document."""
        return int(self.cuts.shape[1])

    @property
    def k(self) -> int:
        """k: tokens per continuation."""
        return int(self.gt_ids.shape[1])


@dataclass
class RolloutBatch:
    """Rollout output: G continuations of k tokens per prefix, rows ``prefix * G + sample``."""

    tokens: np.ndarray           # [N, k] sampled continuations
    logprobs: np.ndarray         # [N, k] behaviour log-probs at sampling time
    versions: np.ndarray         # [N] weight version that produced each sample
    hidden: Optional[np.ndarray] = None  # [N, k, D] policy hidden at the sampled tokens (None for vLLM)
    samples_per_prefix: int = 1
    compute_s: float = 0.0

    @staticmethod
    def from_continuations(parts: Sequence, version: int, samples_per_prefix: int,
                           with_hidden: bool = True) -> "RolloutBatch":
        """The transport form of per-document :class:`~refine_ray.models.generation.Continuations`
        (in document order), every sample stamped with the weight ``version`` that produced it."""
        tokens = np.concatenate([p.tokens.cpu().numpy() for p in parts]).astype(np.int64)
        return RolloutBatch(tokens=tokens, logprobs=np.concatenate([p.logprobs.float().cpu().numpy() for p in parts]),
                            versions=np.full(len(tokens), version, dtype=np.int64),
                            hidden=np.concatenate([p.hidden.float().cpu().numpy() for p in parts]) if with_hidden
                            else None, samples_per_prefix=samples_per_prefix)


@dataclass
class RewardBatch:
    """Reward output: one reward per sample, rows as the rollout's."""

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
    samples_per_prefix: int
    ref_logprobs: Optional[np.ndarray] = None
    answers: Optional[DocBatch] = None   # task SFT targets (post-training)

    def select(self, docs: list[int]) -> "LearnBatch":
        """Documents ``docs`` (indices into this batch) with all their sample rows: the controller
        sends each learner rank its own whole documents (system.actor_group.document_shards)."""
        per_doc = self.cuts.shape[1] * self.samples_per_prefix
        rows = np.concatenate([np.arange(d * per_doc, (d + 1) * per_doc) for d in docs]) if docs else np.zeros(0, np.int64)
        return LearnBatch(
            docs=self.docs.select(docs), cuts=self.cuts[docs], responses=self.responses[rows],
            old_logprobs=self.old_logprobs[rows], advantages=self.advantages[rows],
            samples_per_prefix=self.samples_per_prefix,
            ref_logprobs=None if self.ref_logprobs is None else self.ref_logprobs[rows],
            answers=None if self.answers is None else self.answers.select(docs))


def pack_states(states: list[ModelState]) -> dict[str, np.ndarray]:
    """Cut states for transport: one flat dict of numpy arrays, keys ``"<row>:<key>"``.

    Rows keep their own offsets (cuts sit at different positions, which matters
    for models with positions or chunk phase, e.g. LaCT), so they are not merged
    into one batched state here; the rollout batches rows that share a document.
    """
    out: dict[str, np.ndarray] = {}
    for row, st in enumerate(states):
        for key, arr in st.to_numpy().items():
            out[f"{row}:{key}"] = arr
    return out


def unpack_states(arrays: dict[str, np.ndarray], device=None) -> list[ModelState]:
    """Inverse of :func:`pack_states`: the batch-1 states in row order, on ``device``."""
    rows: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        row, sub = key.split(":", 1)
        rows.setdefault(int(row), {})[sub] = arr
    return [ModelState.from_numpy(rows[r], device) for r in sorted(rows)]

"""Data + entropy scorer role: tokenises the rows it is given, scores them, picks cuts.

The controller owns the data position (a :class:`~refine_ray.data.DataCursor`); a scorer
holds the corpus, memory-mapped from datasets' Arrow cache (it reads only the rows it is
given; on another node it opens its own cache), and the current weights, so a restarted
scorer can redo any request. Cut sampling is seeded by (run seed, step, document): a redone
request picks the same cuts.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from refine_ray.config import DataConfig, ModelConfig, RefineConfig, SystemConfig, TokenizerConfig
from refine_ray.data import Corpus, load_tokenizer
from refine_ray.refine.heldout import evaluate_fixed_cuts
from refine_ray.refine.seeding import cut_seed
from refine_ray.refine.policy import build_policy
from refine_ray.refine.scoring import score_document
from refine_ray.transport.batches import DocBatch, ScoredBatch
from roles.common import VersionedWeights, setup_process


class ScorerRole(VersionedWeights):
    """Tokenises corpus rows, scores them with the current policy weights and picks their cuts."""

    def __init__(self, model: ModelConfig, tokenizer: TokenizerConfig, data: DataConfig, refine: RefineConfig,
                 system: SystemConfig, run_seed: int, actor_index: int = 0):
        """``run_seed``: ``train.seed`` (keys the cut draws); ``actor_index``: this actor's index
        in its group; ``system`` chooses the weight-sync receiver. Raises DataError for an
        unreadable ``data.path``."""
        self.device = setup_process(run_seed + actor_index)
        self.init_weight_sync(system, model.dtype)
        self.refine, self.data, self.run_seed = refine, data, run_seed
        tok = load_tokenizer(tokenizer.path)
        self.corpus = Corpus(data, tok)
        self.model = build_policy(model, len(tok), self.device).eval()
        self.model_cfg, self.vocab_size, self.reference_model = model, len(tok), None

    def lengths(self) -> np.ndarray:
        """Token count per corpus row, ``[rows]`` int64 (after truncation to data.max_length), from the
        cached index (built here if the driver did not: refine_ray.data.index)."""
        return self.corpus.lengths()

    def score_rows(self, rows: list[int], step: int) -> ScoredBatch:
        """Read corpus rows ``rows`` (those only), tokenise them and :meth:`score` them for training
        step ``step`` (with their answer tokens when ``data.answer_column`` is set). Raises
        IndexError for a row outside the corpus."""
        docs = [self.corpus.document(r) for r in rows]
        scored = self.score(DocBatch.from_lists(rows, [d.ids for d in docs]), step)
        if self.data.answer_column is not None:
            scored.answers = DocBatch.from_lists(rows, [d.answer_ids for d in docs])
        return scored

    def heldout_nsp(self, docs: DocBatch, num_cuts: int) -> dict[str, float]:
        """Fixed-cut next-sequence metrics ``val/*`` of the current weights on held-out ``docs``
        (:func:`refine_ray.refine.heldout.evaluate_fixed_cuts`, ``num_cuts`` = ``train.val_cuts``),
        with the reference model (the initial weights, built on first use) for ``val/nsp_cosine_frozen``."""
        if self.reference_model is None:
            self.reference_model = build_policy(self.model_cfg, self.vocab_size, self.device).eval()
        ids = [torch.from_numpy(docs.doc(i)).to(self.device) for i in range(len(docs))]
        return evaluate_fixed_cuts(self.model, ids, self.refine, seed=self.run_seed, num_cuts=num_cuts,
                                   reference=self.reference_model, with_ntp=False)   # the learner has val/ntp_loss

    def score(self, docs: DocBatch, step: int) -> ScoredBatch:
        """Score documents with the current weights and choose their cuts (REFINE steps 1-2).

        Per document: :func:`refine_ray.refine.scoring.score_document`, cuts drawn from a
        generator keyed by (``train.seed``, ``step``, document id), so a redone request picks
        the same cuts; with ``refine.prefix_sharing`` the cut states travel too. Returns the
        :class:`ScoredBatch` (``compute_s`` in seconds).
        """
        t0 = time.perf_counter()
        scores = []
        for i in range(len(docs)):
            gen = torch.Generator(device=self.device).manual_seed(
                cut_seed(self.run_seed, step, int(docs.doc_ids[i])))
            scores.append(score_document(self.model, torch.from_numpy(docs.doc(i)).to(self.device), self.refine,
                                         gen, with_states=self.refine.prefix_sharing,
                                         state_stride=self.refine.state_stride))
        return ScoredBatch.from_scores(docs, scores, step, compute_s=time.perf_counter() - t0)

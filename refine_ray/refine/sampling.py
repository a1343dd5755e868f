"""Step 3 of REFINE: G continuations of k tokens per prefix, with behaviour log-probs.

Two backends behind :class:`RolloutEngine`:

* :class:`FastWeightRollout`, our engine for fast-weight models: either prefill
  each prefix once (re-encode) or start directly from the cut states the scorer
  cached (prefix sharing), then k O(1) recurrent decode steps. It also returns
  the policy's hidden states at the sampled tokens, which the cosine reward needs.
* :class:`VLLMRollout` (refine_ray.serving.vllm_rollout) for architectures vLLM supports.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from refine_ray.system.batches import RolloutBatch, ScoredBatch
from refine_ray.config import RefineConfig
from refine_ray.refine.seeding import ROLLOUT_STREAM, row_seed
from refine_ray.models.base import ModelState
from refine_ray.models.generation import prefill, sample_continuations
from refine_ray.refine.scoring import unpack_states


class RolloutEngine(Protocol):
    def generate(self, batch: ScoredBatch, version: int) -> RolloutBatch: ...
    def load_weights(self, weights: dict[str, np.ndarray]) -> None: ...


class FastWeightRollout:
    def __init__(self, model, cfg: RefineConfig, seed: int = 0):
        self.model = model.eval()
        self.cfg = cfg
        self.seed = seed
        self.device = next(model.parameters()).device

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        from refine_ray.refine.policy import load_numpy_weights

        load_numpy_weights(self.model, weights)

    @torch.no_grad()
    def generate(self, batch: ScoredBatch, version: int) -> RolloutBatch:
        G, k = self.cfg.samples_per_prefix, batch.k
        prefixes: list[tuple[ModelState, torch.Tensor]] = []
        if batch.cut_states is not None:
            states = unpack_states(batch.cut_states, self.device)
            hidden = torch.from_numpy(batch.cut_hidden).to(self.device)
            prefixes = [(st, hidden[i:i + 1]) for i, st in enumerate(states)]
        else:
            prompts = [torch.from_numpy(batch.docs.doc(d)[:c]).to(self.device)
                       for d in range(len(batch.docs)) for c in batch.cuts[d].tolist()]
            for p in prompts:  # one row at a time: no padding ever enters a state
                prefixes.append(prefill(self.model, [p]))
        dtype = next(self.model.parameters()).dtype
        groups = self._batches(prefixes, batch)
        tokens, logprobs, hiddens = [], [], []
        for state, last_hidden, seed in groups:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            out = sample_continuations(self.model, state.repeat_interleave(G),
                                       last_hidden.to(dtype).repeat_interleave(G, 0), k,
                                       temperature=self.cfg.temperature, top_p=self.cfg.top_p, generator=gen)
            tokens.append(out.tokens)
            logprobs.append(out.logprobs)
            hiddens.append(out.hidden.float())
        n_rows = len(prefixes) * G
        return RolloutBatch(tokens=torch.cat(tokens).cpu().numpy(), logprobs=torch.cat(logprobs).float().cpu().numpy(),
                            versions=np.full(n_rows, version, dtype=np.int64),
                            hidden=torch.cat(hiddens).cpu().numpy(), samples_per_prefix=G)

    def _batches(self, prefixes: list[tuple[ModelState, torch.Tensor]], batch: ScoredBatch):
        """Decode batches with their sampling seeds, rows in prefix order.

        Seeds are keyed by (run, step, documents[, cut]), never by the actor, so a
        re-issued request samples exactly the same tokens.
        """
        docs = [int(d) for d in batch.docs.doc_ids]
        groups = decode_batches(self.model, prefixes)
        if len(groups) == 1 and len(prefixes) > 1:
            return [(*groups[0], row_seed(self.seed, ROLLOUT_STREAM, batch.step, *docs))]
        n = batch.n_chunks
        return [(s, h, row_seed(self.seed, ROLLOUT_STREAM, batch.step, docs[p // n], p % n))
                for p, (s, h) in enumerate(groups)]


def decode_batches(model, prefixes: list[tuple[ModelState, torch.Tensor]]) -> list[tuple[ModelState, torch.Tensor]]:
    """Group per-prefix (state, last hidden) pairs into decode batches, rows in prefix order.

    Offset-free states (DeltaNet, GatedDeltaNet) decode every prefix in one batch: k decode
    steps for all cuts instead of k per cut. States tied to their position (LaCT: RoPE and
    chunk phase) decode one prefix at a time.
    """
    if getattr(model, "offset_free_state", False) and len(prefixes) > 1:
        state = ModelState.cat([ModelState(s.layers, 0) for s, _ in prefixes])
        return [(state, torch.cat([h for _, h in prefixes], 0))]
    return list(prefixes)

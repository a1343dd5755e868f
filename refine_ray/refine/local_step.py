"""One single-process REFINE (or NTP-only) update of a plain torch model + optimizer.

No Ray, no DeepSpeed: the same library functions the multi-role pipeline uses, run
in one process (test-time training, debugging, small CPU runs):

    score_document (cuts + ground truth + cut states)
    -> sample_continuations from each cut state (k tokens, G samples, behaviour log-probs)
    -> SequenceRewarder (cosine on policy hidden / exact / hybrid; or a frozen encoder)
    -> grpo_advantages over make_group_ids groups
    -> document_logprobs (shared trunk or re-encode, ``refine.prefix_sharing``)
    -> ppo_clip_loss + NTP (refine_loss) -> backward -> grad clip -> one optimizer step.

Decisions: every document is scored and sampled with the weights *before* the step,
then all documents' losses are accumulated (each divided by the number of documents)
into **one** optimizer step, as the learner does per batch. Documents too short for
``n_chunks`` cuts of ``response_length`` tokens (or when ``mode='ntp'``) contribute
the NTP loss only, with coefficient 1 when ``refine.ntp_coef`` is 0, and are counted
in ``ntp_only_docs``; documents under 2 tokens have no NTP target and are skipped
(``skipped_docs``). KL to a reference is not supported here (no reference model).
The model's train/eval mode is left as the caller set it.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from refine_ray.algo import grpo_advantages, make_group_ids, ppo_clip_loss, refine_loss
from refine_ray.system.batches import DocBatch, RolloutBatch, ScoredBatch
from refine_ray.config import ConfigError, RefineConfig
from refine_ray.models.generation import Continuations, sample_continuations
from refine_ray.refine.rewarding import SequenceRewarder, reward_metrics
from refine_ray.refine.sampling import decode_batches
from refine_ray.refine.scoring import DocumentScore, min_document_tokens, score_document
from refine_ray.refine.sequence_logprobs import document_logprobs, document_ntp_loss

Mode = Literal["refine", "ntp"]


def _sample_at_cuts(model, score: DocumentScore, cfg: RefineConfig,
                    generator: Optional[torch.Generator]) -> Continuations:
    """G continuations of k tokens from every cut state; rows ordered cut-major, then sample."""
    G, k = cfg.samples_per_prefix, cfg.response_length
    hidden = score.cut_hidden.to(dtype=next(model.parameters()).dtype)
    groups = decode_batches(model, [(st, hidden[j:j + 1]) for j, st in enumerate(score.cut_states)])
    parts = [sample_continuations(model, st.repeat_interleave(G), h.repeat_interleave(G, 0), k,
                                  cfg.temperature, cfg.top_p, generator) for st, h in groups]
    if len(parts) == 1:
        return parts[0]
    return Continuations(torch.cat([p.tokens for p in parts]), torch.cat([p.logprobs for p in parts]),
                         torch.cat([p.hidden for p in parts]), parts[-1].state)


class LocalRefineStep:
    """Callable REFINE update for one model + optimizer; holds the rewarder and RNG.

    ``step(docs)`` takes 1-D LongTensors of unpadded token ids and returns float metrics.
    """

    def __init__(self, model, optimizer: torch.optim.Optimizer, cfg: RefineConfig, grad_clip: float = 1.0,
                 tokenizer=None, encoder_path: Optional[str] = None, seed: int = 0):
        if cfg.kl_coef > 0:
            raise ConfigError("refine.kl_coef: > 0 is not supported by the single-process step (no reference model)")
        self.model, self.optimizer, self.cfg, self.grad_clip = model, optimizer, cfg, grad_clip
        self.tokenizer, self.encoder_path = tokenizer, encoder_path
        self._rewarder: Optional[SequenceRewarder] = None
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.min_tokens = min_document_tokens(cfg)

    @property
    def rewarder(self) -> SequenceRewarder:
        if self._rewarder is None:   # lazy: the encoder source loads a model
            self._rewarder = SequenceRewarder(self.cfg.reward, self.cfg.reward_source, self.tokenizer,
                                              self.encoder_path)
        return self._rewarder

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def step(self, docs: Sequence[torch.Tensor], mode: Mode = "refine") -> dict[str, float]:
        if mode not in ("refine", "ntp"):
            raise ValueError(f"mode must be 'refine' or 'ntp', got {mode!r}")
        cfg, model = self.cfg, self.model
        docs = [d.to(self.device).long() for d in docs]
        usable = [d for d in docs if d.numel() >= 2]
        metrics: dict[str, float] = defaultdict(float)
        metrics["skipped_docs"] = float(len(docs) - len(usable))
        if not usable:
            metrics.update(loss=0.0, grad_norm=0.0, refine_docs=0.0, ntp_only_docs=0.0, stepped=0.0)
            return dict(metrics)
        refine_idx = [i for i, d in enumerate(usable) if mode == "refine" and d.numel() >= self.min_tokens]
        rollout = self._rollouts([usable[i] for i in refine_idx]) if refine_idx else None
        if rollout is not None:
            metrics.update(rollout["metrics"])
        self.optimizer.zero_grad(set_to_none=True)
        per_doc = cfg.n_chunks * cfg.samples_per_prefix
        sums: dict[str, float] = defaultdict(float)
        for i, ids in enumerate(usable):
            if i in refine_idx:
                r = refine_idx.index(i)
                rows = slice(r * per_doc, (r + 1) * per_doc)
                out = document_logprobs(model, ids, rollout["cuts"][r], rollout["tokens"][rows],
                                        cfg.samples_per_prefix, cfg.temperature, shared=cfg.prefix_sharing,
                                        with_ntp=cfg.ntp_coef > 0)
                old, adv = rollout["old"][rows], rollout["adv"][rows]
                pg, pg_m = ppo_clip_loss(out.logprobs, old, adv, torch.ones_like(old), cfg.clip_low,
                                         cfg.clip_high, cfg.dual_clip)
                ntp = out.ntp_loss if out.ntp_loss is not None else torch.zeros((), device=self.device)
                loss = refine_loss(ntp, pg, None, cfg.ntp_coef, cfg.pg_coef)
                sums["pg_loss"] += float(pg.detach())
                for name, value in pg_m.items():
                    sums[name] += float(value)
            else:
                ntp = document_ntp_loss(model, ids)
                loss = (cfg.ntp_coef or 1.0) * ntp
            (loss / len(usable)).backward()
            sums["loss"] += float(loss.detach())
            sums["ntp_loss"] += float(ntp.detach())
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip) if params else torch.zeros(())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for name in ("loss", "ntp_loss"):
            metrics[name] = sums[name] / len(usable)
        for name in ("pg_loss", "clipfrac", "approx_kl", "clipfrac_lower"):
            if refine_idx:
                metrics[name] = sums[name] / len(refine_idx)
        metrics.update(grad_norm=float(grad_norm), refine_docs=float(len(refine_idx)),
                       ntp_only_docs=float(len(usable) - len(refine_idx)), stepped=1.0)
        return dict(metrics)

    def _rollouts(self, docs: list[torch.Tensor]) -> dict:
        """Score, sample and reward every document with the current weights (no grad)."""
        cfg, model = self.cfg, self.model
        G = cfg.samples_per_prefix
        scores, conts = [], []
        for ids in docs:
            score = score_document(model, ids, cfg, generator=self.generator, with_states=True)
            scores.append(score)
            conts.append(_sample_at_cuts(model, score, cfg, self.generator))
        cpu = [d.cpu().numpy() for d in docs]
        scored = ScoredBatch(
            docs=DocBatch.from_lists(list(range(len(docs))), cpu),
            cuts=np.stack([s.cuts.cpu().numpy() for s in scores]),
            gt_ids=np.concatenate([s.gt_ids.cpu().numpy() for s in scores]),
            gt_hidden=np.concatenate([s.gt_hidden.float().cpu().numpy() for s in scores]),
            cut_entropy=np.concatenate([s.cut_entropy.float().cpu().numpy() for s in scores]), version=0)
        tokens = torch.cat([c.tokens for c in conts])
        old = torch.cat([c.logprobs for c in conts]).float()
        rollout = RolloutBatch(tokens=tokens.cpu().numpy(), logprobs=old.cpu().numpy(),
                               versions=np.zeros(tokens.shape[0], np.int64),
                               hidden=torch.cat([c.hidden for c in conts]).float().cpu().numpy(),
                               samples_per_prefix=G)
        rewards = self.rewarder(scored, rollout)
        r = torch.from_numpy(rewards.rewards)
        adv = grpo_advantages(r, make_group_ids(len(docs), cfg.n_chunks, G), normalize_std=cfg.normalize_adv_std)
        metrics = reward_metrics(rewards)
        metrics["adv/abs_mean"] = float(adv.abs().mean())
        return {"cuts": [s.cuts for s in scores], "tokens": tokens.to(self.device), "old": old.to(self.device),
                "adv": adv.to(self.device), "metrics": metrics}

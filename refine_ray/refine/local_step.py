"""One single-process REFINE (or NTP-only) update of a plain torch model + optimizer.

No Ray, no DeepSpeed: the pipeline's functions run in one process (test-time training,
debugging, small CPU runs):

    score_document (cuts + ground truth + cut states)
    -> sample_at_cuts (k tokens, G samples per cut, behaviour log-probs)
    -> SequenceRewarder (cosine on policy hidden / exact / hybrid; or a frozen encoder)
    -> grpo_advantages over make_group_ids groups            (:meth:`LocalRefineStep.collect`)
    -> document_loss (the DeepSpeed learner's own loss) -> backward
    -> grad clip -> an optimizer step per mini-batch           (:meth:`LocalRefineStep.update`)

Decisions: every document is scored and sampled with the weights *before* the step,
then the documents' losses are accumulated (each divided by the documents of its
mini-batch) into one optimizer step per ``refine.ppo_mini_batch_size`` documents (None:
**one** step for all), as the learner does per batch; the NTP term is pooled as
``refine.ntp_loss_agg_mode`` says (:func:`refine_ray.refine.loss.cross_entropy_weights`).
Upstream ReFINE's test-time training: batches of 8 prompts in mini-batches of 4, token-mean
over micro-batches of 2. Documents too short for
``n_chunks`` cuts of ``response_length`` tokens (or when ``mode='ntp'``) contribute
the NTP loss only, with coefficient 1 when ``refine.ntp_coef`` is 0, and are counted
in ``ntp_only_docs``; documents under 2 tokens have no NTP target and are skipped
(``skipped_docs``). KL to a reference model is not supported here. ``refine.reward_source=frozen``
reads both sides of the cosine from a frozen reference model: the ``reference`` given, else a
copy of the model taken when the step is built (its initial weights).
The model's train/eval mode is left as the caller set it.

Seeds are keyed like the distributed pipeline's (refine_ray.refine.seeding), by
(``seed``, the step counter, the document's index in ``docs``, cut index, sample index);
:meth:`LocalRefineStep.reseed` sets the seed and restarts the counter.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from refine_ray.algo import grpo_advantages, make_group_ids
from refine_ray.config import ConfigError, RefineConfig
from refine_ray.refine.collapse import step_collapse_metrics
from refine_ray.refine.frozen_reference import reference_hidden
from refine_ray.refine.loss import cross_entropy_weights, document_loss, first_non_finite
from refine_ray.refine.rewarding import SequenceRewarder, advantage_metrics, reward_metrics
from refine_ray.refine.sampling import continuation_seeds, sample_at_cuts
from refine_ray.refine.scoring import min_document_tokens, score_document
from refine_ray.refine.seeding import cut_seed
from refine_ray.refine.sequence_logprobs import document_ntp_loss

Mode = Literal["refine", "ntp"]


@dataclass
class Experience:
    """Rollouts of the documents ``refine_docs`` (indices into the step's document list).

    Per-sample rows are ``(i * n + cut) * G + sample`` for the i-th entry of ``refine_docs``.
    """

    refine_docs: list[int]
    cuts: list[torch.Tensor]          # per refine document, [n] long
    responses: torch.Tensor           # [D*n*G, k] long
    old_logprobs: torch.Tensor        # [D*n*G, k] float32 behaviour log-probs
    advantages: torch.Tensor          # [D*n*G] float32
    metrics: dict[str, float]         # train_cuts/*, advantage/*, cut_entropy, collapse/*


class LocalRefineStep:
    """Callable REFINE update for one model + optimizer; holds the rewarder and the seed keys.

    ``step(docs)`` takes 1-D LongTensors of unpadded token ids and returns float metrics.
    ``reference``: the frozen model of ``reward_source=frozen`` (None: a frozen copy of
    ``model`` as it is now). Raises ConfigError for ``refine.kl_coef > 0``.
    """

    def __init__(self, model, optimizer: torch.optim.Optimizer, cfg: RefineConfig, grad_clip: float = 1.0,
                 tokenizer=None, encoder_path: Optional[str] = None, seed: int = 0, reference=None):
        if cfg.kl_coef > 0:
            raise ConfigError("refine.kl_coef: > 0 is not supported by the single-process step (no reference model)")
        self.model, self.optimizer, self.cfg, self.grad_clip = model, optimizer, cfg, grad_clip
        self.tokenizer, self.encoder_path = tokenizer, encoder_path
        self._rewarder: Optional[SequenceRewarder] = None
        self.device = next(model.parameters()).device
        self.seed, self.step_index = seed, 0
        self.min_tokens = min_document_tokens(cfg)
        self.reference = None
        if cfg.reward_source == "frozen" and cfg.reward != "exact":
            self.reference = (reference if reference is not None else copy.deepcopy(model)).eval().requires_grad_(False)

    @property
    def rewarder(self) -> SequenceRewarder:
        """The configured :class:`SequenceRewarder`, built on first use (the encoder source loads a model)."""
        if self._rewarder is None:
            self._rewarder = SequenceRewarder(self.cfg.reward, self.cfg.reward_source, self.tokenizer,
                                              self.encoder_path)
        return self._rewarder

    def reseed(self, seed: int) -> None:
        """Key the following steps' cuts and samples by ``seed``, the step counter back at 0."""
        self.seed, self.step_index = seed, 0

    def step(self, docs: Sequence[torch.Tensor], mode: Mode = "refine",
             ntp_targets: Optional[Sequence[torch.Tensor]] = None) -> dict[str, float]:
        """Collect rollouts for ``docs`` (1-D long token ids) and make the optimizer steps (one per
        mini-batch).

        ``ntp_targets``: per document an ``[L]`` bool mask of the tokens its NTP loss counts
        (e.g. answers only); None: every token but the first. Raises ValueError when a mask's
        length is not its document's.

        Returns ``loss``, ``ntp_loss`` (means over usable documents), ``pg_loss``,
        ``clipfrac``, ``clipfrac_lower``, ``approx_kl`` (means over REFINE documents),
        ``grad_norm`` (before clipping; mean over the optimizer steps), ``optimizer_steps``, the
        reward metrics, ``refine_docs``, ``ntp_only_docs``, ``skipped_docs`` and ``stepped`` (0
        when no document was usable).
        Raises ValueError for an unknown ``mode``; FloatingPointError (one line naming the first
        non-finite loss term and its document; that optimizer step not applied) for a non-finite
        gradient norm.
        """
        if mode not in ("refine", "ntp"):
            raise ValueError(f"mode must be 'refine' or 'ntp', got {mode!r}")
        docs = [d.to(self.device).long() for d in docs]
        targets = None
        if ntp_targets is not None:
            if len(ntp_targets) != len(docs) or any(t.shape != d.shape for t, d in zip(ntp_targets, docs)):
                raise ValueError("ntp_targets: one [L] bool mask per document, of its length, expected")
            targets = [t.to(self.device).bool() for t, d in zip(ntp_targets, docs) if d.numel() >= 2]
        usable = [d for d in docs if d.numel() >= 2]
        if not usable:
            self.step_index += 1
            return {"skipped_docs": float(len(docs)), "loss": 0.0, "grad_norm": 0.0, "refine_docs": 0.0,
                    "ntp_only_docs": 0.0, "stepped": 0.0, "optimizer_steps": 0.0}
        refine_docs = [i for i, d in enumerate(usable) if mode == "refine" and d.numel() >= self.min_tokens]
        experience = self.collect(usable, refine_docs)
        metrics = self.update(usable, experience, targets)
        metrics["skipped_docs"] = float(len(docs) - len(usable))
        self.step_index += 1
        return metrics

    @torch.no_grad()
    def collect(self, docs: Sequence[torch.Tensor], refine_docs: Sequence[int],
                cuts: Optional[Sequence[torch.Tensor]] = None) -> Experience:
        """Score, sample and reward ``docs[i]`` for i in ``refine_docs`` with the current weights.

        Cuts and samples are keyed by (seed, step counter, i[, cut, sample]). ``cuts``: instead,
        per entry of ``refine_docs`` the ``[n_chunks]`` long cuts to train at (cuts a caller holds
        fixed across steps; the samples stay keyed by the step counter). Each document needs at
        least ``min_document_tokens(cfg)`` tokens (``sample_cuts`` raises otherwise); given cuts
        out of range raise ValueError (``score_document``).
        """
        cfg, model, G = self.cfg, self.model, self.cfg.samples_per_prefix
        scores, conts = [], []
        for j, i in enumerate(refine_docs):
            gen = torch.Generator(device=self.device).manual_seed(cut_seed(self.seed, self.step_index, i))
            score = score_document(model, docs[i], cfg, generator=gen, with_states=True, states_device=None,
                                   cuts=None if cuts is None else cuts[j])
            seeds = continuation_seeds(self.seed, self.step_index, i, score.cuts.numel(), G)
            conts.append(sample_at_cuts(model, score.cut_states, score.cut_hidden, cfg.response_length, G,
                                        cfg.temperature, cfg.top_p, seeds))
            scores.append(score)
        if not scores:
            empty = torch.zeros(0, cfg.response_length, device=self.device)
            return Experience([], [], empty.long(), empty, empty[:, 0], {})
        tokens = torch.cat([c.tokens for c in conts])
        if self.reference is not None:      # reward_source=frozen: both sides from the frozen reference model
            pairs = [reference_hidden(self.reference, docs[i], s.cuts, c.tokens, G)
                     for i, s, c in zip(refine_docs, scores, conts)]
            response_hidden, true_hidden = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        else:
            response_hidden, true_hidden = torch.cat([c.hidden for c in conts]), torch.cat([s.gt_hidden for s in scores])
        rewards = self.rewarder(tokens, torch.cat([s.gt_ids for s in scores]), response_hidden, true_hidden)
        adv = grpo_advantages(rewards.rewards, make_group_ids(len(scores), cfg.n_chunks, G),
                              normalize_std=cfg.normalize_adv_std)
        metrics = reward_metrics(rewards)
        metrics.update(advantage_metrics(adv))
        metrics.update(step_collapse_metrics(torch.cat([s.gt_hidden for s in scores]),
                                             torch.cat([s.cut_entropy for s in scores]), tokens))
        return Experience(list(refine_docs), [s.cuts for s in scores], tokens,
                          torch.cat([c.logprobs for c in conts]).float(), adv.to(self.device), metrics)

    def update(self, docs: Sequence[torch.Tensor], experience: Experience,
               ntp_targets: Optional[Sequence[torch.Tensor]] = None) -> dict[str, float]:
        """The optimizer steps: ``docs`` in consecutive mini-batches of ``refine.ppo_mini_batch_size``
        (None: one of all; the last may be shorter, as verl splits), each document's loss / the
        documents of its mini-batch, accumulated, clipped, one step per mini-batch.

        REFINE documents (``experience.refine_docs``) take :func:`document_loss`; the others
        the NTP loss alone (coefficient ``refine.ntp_coef``, or 1 when it is 0); both weighted by
        :func:`cross_entropy_weights`. Returns the metrics described in :meth:`step` (without
        ``skipped_docs``).
        """
        cfg = self.cfg
        rows_per_doc = cfg.n_chunks * cfg.samples_per_prefix
        position = {d: r for r, d in enumerate(experience.refine_docs)}
        size = min(cfg.ppo_mini_batch_size or len(docs), len(docs))
        counts = [int(ids.numel() - 1) if ntp_targets is None else int(ntp_targets[i][1:].sum())
                  for i, ids in enumerate(docs)]
        weights = cross_entropy_weights(counts, cfg, size)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sums: dict[str, float] = defaultdict(float)
        norms, bad = [], None
        for start in range(0, len(docs), size):
            mini = range(start, min(start + size, len(docs)))
            self.optimizer.zero_grad(set_to_none=True)
            for i in mini:
                targets = None if ntp_targets is None else ntp_targets[i]
                if i in position:
                    rows = slice(position[i] * rows_per_doc, (position[i] + 1) * rows_per_doc)
                    loss, doc_metrics = document_loss(self.model, docs[i], experience.cuts[position[i]],
                                                      experience.responses[rows], experience.old_logprobs[rows],
                                                      experience.advantages[rows], cfg, ntp_targets=targets,
                                                      ntp_weight=weights[i])
                    for name, value in doc_metrics.items():
                        sums[name] += value
                else:
                    ntp = weights[i] * document_ntp_loss(self.model, docs[i], targets=targets)
                    loss = (cfg.ntp_coef or 1.0) * ntp
                    doc_metrics = {"loss": float(loss.detach()), "ntp_loss": float(ntp.detach())}
                    sums["loss"] += doc_metrics["loss"]
                    sums["ntp_loss"] += doc_metrics["ntp_loss"]
                bad = bad or first_non_finite(doc_metrics, i)
                (loss / len(mini)).backward()
            with_grad = [p for p in params if p.grad is not None]
            norms.append(float(torch.nn.utils.clip_grad_norm_(with_grad, self.grad_clip)) if with_grad else 0.0)
            if not math.isfinite(norms[-1]):
                self.optimizer.zero_grad(set_to_none=True)
                where = (f"{bad[2]} is {bad[1]} on document {int(bad[0])} of the batch, so " if bad else
                         "the losses are finite but ")
                raise FloatingPointError(f"non-finite local REFINE step: {where}the gradient norm is {norms[-1]}; "
                                         f"the optimizer step was not applied")
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        n_refine = len(experience.refine_docs)
        metrics = dict(experience.metrics)
        metrics.update(loss=sums["loss"] / len(docs), ntp_loss=sums["ntp_loss"] / len(docs))
        for name in ("pg_loss", "clipfrac", "approx_kl", "clipfrac_lower"):
            if n_refine:
                metrics[name] = sums[name] / n_refine
        metrics.update(grad_norm=sum(norms) / len(norms), optimizer_steps=float(len(norms)),
                       refine_docs=float(n_refine), ntp_only_docs=float(len(docs) - n_refine), stepped=1.0)
        return metrics

"""Step 5 of REFINE for one document: the loss whose gradient trains the policy.

:func:`document_loss` is the one place where the per-document REFINE objective is
assembled; the DeepSpeed learner rank (roles.learner), the single-process step
(:mod:`refine_ray.refine.local_step`, test-time training) and ``scripts/bench_nsp.py`` all
call it, so the three paths give the same loss and gradients on the same inputs (tested).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from refine_ray.algo import agg_loss, kl_penalty, micro_batch_token_mean_weights, ppo_clip_loss, refine_loss
from refine_ray.config import RefineConfig
from refine_ray.refine.sequence_logprobs import document_logprobs


def document_loss(model, ids: torch.Tensor, cuts: torch.Tensor, responses: torch.Tensor,
                  old_logprobs: torch.Tensor, advantages: torch.Tensor, cfg: RefineConfig,
                  ref_logprobs: Optional[torch.Tensor] = None,
                  ntp_head_calls: int = 0,
                  ntp_targets: Optional[torch.Tensor] = None,
                  ntp_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``c_ntp * NTP + c_pg * PPO-clip + c_kl * KL`` of one document, differentiable in ``model``.

    Args:
        ids: ``[L]`` long, the unpadded document.
        cuts: ``[n]`` prefix lengths (prefix = ``ids[:cut]``).
        responses: ``[n*G, k]`` long sampled continuations, row = cut_index * G + sample.
        old_logprobs: ``[n*G, k]`` float behaviour log-probs (from the sampler).
        advantages: ``[n*G]`` float GRPO advantages (one per sample, broadcast over its k tokens).
        cfg: ``refine`` section: ``temperature``, ``prefix_sharing`` (shared trunk or re-encode,
            same numbers), ``clip_low/high``, ``dual_clip``, ``ntp_coef``, ``pg_coef``,
            ``kl_coef``, ``kl_type``.
        ref_logprobs: ``[n*G, k]`` reference-model log-probs; required when ``kl_coef > 0``.
        ntp_head_calls: the NTP loss calls the LM head at least this often (ZeRO-3 lockstep).
        ntp_targets: ``[L]`` bool, the tokens the NTP loss counts (None: all but the first;
            e.g. answer tokens only for a recall task).
        ntp_weight: multiplies the document's mean NTP loss: 1 for ``seq-mean-token-mean``, the
            document's :func:`refine_ray.algo.micro_batch_token_mean_weights` for ``token-mean``.

    Returns:
        ``(loss, metrics)``: the scalar float32 loss and float metrics ``loss``, ``ntp_loss``
        (weighted by ``ntp_weight``, so averaged over documents it is the batch's NTP term; 0
        when ``ntp_coef`` is 0: not computed), ``pg_loss``, ``clipfrac``,
        ``clipfrac_lower``, ``approx_kl`` and, with KL, ``kl``.

    Sources: REFINE (the NTP + c_pg·GRPO mix, paper coefficients 1 and 0.2), PPO-clip with
    dual clip and verl's token-mean aggregation over the document's n·G·k tokens
    (:func:`refine_ray.algo.ppo_clip_loss`), verl's KL estimators (:func:`refine_ray.algo.kl_penalty`).

    Raises:
        ValueError: when ``responses`` does not hold G rows per cut, or KL is on without
            ``ref_logprobs``.
    """
    n = int(cuts.numel())
    if n == 0 or responses.shape[0] % n:
        raise ValueError(f"document_loss: {responses.shape[0]} responses do not split into {n} cuts x G samples")
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("document_loss: refine.kl_coef > 0 needs the reference model's log-probs (reference.enabled)")
    device = responses.device
    out = document_logprobs(model, ids, cuts, responses, responses.shape[0] // n, cfg.temperature,
                            shared=cfg.prefix_sharing, with_ntp=cfg.ntp_coef > 0, ntp_head_calls=ntp_head_calls,
                            ntp_targets=ntp_targets)
    old = old_logprobs.to(device=device, dtype=torch.float32)
    mask = torch.ones_like(old)
    pg, pg_metrics = ppo_clip_loss(out.logprobs, old, advantages.to(device), mask, cfg.clip_low, cfg.clip_high,
                                   cfg.dual_clip)
    kl = None
    if cfg.kl_coef > 0:
        kl = agg_loss(kl_penalty(out.logprobs, ref_logprobs.to(device), cfg.kl_type), mask)
    ntp = out.ntp_loss * ntp_weight if out.ntp_loss is not None else torch.zeros((), device=device)
    loss = refine_loss(ntp, pg, kl, cfg.ntp_coef, cfg.pg_coef, cfg.kl_coef)
    metrics = {"loss": float(loss.detach()), "ntp_loss": float(ntp.detach()), "pg_loss": float(pg.detach())}
    metrics.update({name: float(value) for name, value in pg_metrics.items()})
    if kl is not None:
        metrics["kl"] = float(kl.detach())
    return loss, metrics


# The loss terms checked for finiteness, in the order a failure names them.
CHECKED_TERMS = ("ntp_loss", "pg_loss", "kl", "task_sft_loss")


def first_non_finite(metrics: dict[str, float], doc_id: int) -> Optional[tuple[float, float, str]]:
    """``(doc_id, value, term)`` of the first term of :data:`CHECKED_TERMS` in ``metrics`` (a
    document's loss metrics, floats) that is NaN or inf, else None. Both step paths (the learner
    rank, the single-process step) use it to name what made a gradient norm non-finite."""
    for term in CHECKED_TERMS:
        if term in metrics and not math.isfinite(metrics[term]):
            return (float(doc_id), metrics[term], term)
    return None


def cross_entropy_weights(token_counts: Sequence[int], cfg: RefineConfig, step: int) -> list[float]:
    """Per-document weights (``ntp_weight``) of the cross-entropy terms, NTP and task SFT, under
    ``refine.ntp_loss_agg_mode``, for documents accumulated ``step`` per optimizer step.

    ``token_counts``: the tokens each document's loss counts, in the order the documents are
    accumulated. ``seq-mean-token-mean`` (ours): 1 each, every document weighs the same.
    ``token-mean`` (upstream ReFINE): within each optimizer step's documents, micro-batches of
    ``ppo_micro_batch_size_per_gpu`` consecutive documents pool their tokens, as the HF loss of
    upstream ReFINE's micro-batch does (:func:`refine_ray.algo.micro_batch_token_mean_weights`).
    """
    if cfg.ntp_loss_agg_mode == "seq-mean-token-mean":
        return [1.0] * len(token_counts)
    return [float(w) for s in range(0, len(token_counts), step)
            for w in micro_batch_token_mean_weights(list(token_counts[s:s + step]), cfg.ppo_micro_batch_size_per_gpu)]


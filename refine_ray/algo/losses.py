"""Losses: PPO-clip (verl semantics), NTP cross-entropy (plain and chunked), KL, total.

All reductions are computed in float32. Empty masks give a loss of 0, never NaN.
Masks select (``torch.where``), never multiply: a position under a zero mask may hold
-inf or NaN (e.g. the log-prob of a padded token) and must neither reach the loss
(0 * inf = NaN) nor its gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "AGG_MODES",
    "logprobs_from_logits",
    "agg_loss",
    "ppo_clip_loss",
    "ntp_loss",
    "ntp_loss_from_hidden",
    "head_calls",
    "micro_batch_token_mean_weights",
    "kl_penalty",
    "refine_loss",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def logprobs_from_logits(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``log softmax(logits / temperature)[ids]``: ``[..., V], [...] -> [...]`` float32.

    Same alignment as the inputs: ``logits[..., t, :]`` scores ``ids[..., t]``; the
    caller shifts (response logits come from the positions before each token).

    The one log-prob function of the project: the samplers (models.generation) and the
    learner (refine.sequence_logprobs) both call it, so PPO's ratio is exactly 1 on-policy up
    to the forward passes' own float noise (issue 15). Computed as picked logit minus
    ``logsumexp`` in float32 (~1e-6 from float64 over a 30k vocabulary); ``log_softmax`` then
    a gather was 1e-5-5e-5 off on trained weights. Raises ValueError for temperature <= 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    picked = z.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask`` where the mask is non-zero, exactly 0 elsewhere (whatever x holds there)."""
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked(x, mask).sum() / mask.sum().clamp(min=1.0)


def agg_loss(values: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Reduce a ``[N, k]`` per-token loss to a scalar.

    ``token-mean``: sum over valid tokens / number of valid tokens.
    ``seq-mean-token-mean``: mean over rows of each row's masked token mean.
    ``seq-mean-token-sum``: mean over rows of each row's masked token sum.
    Rows without valid tokens are left out of the seq-mean. verl (``core_algos.agg_loss``,
    0.5) gives NaN for such a row only in ``seq-mean-token-mean`` (its 0/0); its
    ``seq-mean-token-sum`` counts the row as a 0 in the mean (here: left out), and its
    ``token-mean`` over an all-zero mask is 0 as here (``masked_mean`` adds 1e-8).
    """
    m = mask.to(torch.float32)
    v = values.float()
    if agg == "token-mean":
        return _masked_mean(v, m)
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        tok = m.sum(dim=-1)
        row = _masked(v, m).sum(dim=-1)
        if agg == "seq-mean-token-mean":
            row = row / tok.clamp(min=1.0)
        has = (tok > 0).float()
        return _masked(row, has).sum() / has.sum().clamp(min=1.0)
    raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {AGG_MODES}")


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = 3.0,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO policy loss, as verl's ``compute_policy_loss``.

    ``ratio = exp(clamp(logp - old_logp, -20, 20))``;
    ``l = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high))``; for ``A < 0`` only,
    dual clip bounds it: ``min(l, -A*dual_clip)`` (``dual_clip=None`` disables; must be > 1).
    ``advantages`` is ``[N]`` (broadcast over k) or ``[N, k]``.
    Metrics (detached, over valid tokens): ``clipfrac`` fraction where the clipped
    term is active; ``clipfrac_lower`` fraction where the dual clip is active;
    ``approx_kl`` = mean(old_logp - logp).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    m = mask.to(torch.float32)
    # Masked positions are zeroed before any arithmetic, so their -inf/NaN never reach a gradient.
    adv, logp, old_logp = (_masked(t.float(), m != 0) for t in (advantages, logp, old_logp))
    neg_kl = torch.clamp(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(l1, l2)
    metrics = {
        "clipfrac": _masked_mean((l2 > l1).float(), m).detach(),
        "approx_kl": _masked_mean(-neg_kl, m).detach(),
    }
    if dual_clip is not None:
        l3 = -adv * dual_clip
        lower = (clipped > l3) & (adv < 0)
        losses = torch.where(adv < 0, torch.minimum(clipped, l3), clipped)
        metrics["clipfrac_lower"] = _masked_mean(lower.float(), m).detach()
    else:
        losses = clipped
        metrics["clipfrac_lower"] = torch.zeros((), device=logp.device)
    return agg_loss(losses, m, agg), metrics


def _ntp_valid(mask: torch.Tensor) -> torch.Tensor:
    """Target t+1 counts iff both the input position t and the target t+1 are real."""
    m = mask.bool()
    return m[:, :-1] & m[:, 1:]


def ntp_loss(logits: torch.Tensor, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross-entropy; ``logits [B,T,V]``, ``ids [B,T]``, ``mask [B,T]``.

    ``logits[:, t]`` predicts ``ids[:, t+1]``. A target counts iff ``mask`` is 1 at
    both t and t+1, so pads never count as targets nor as context (the first real
    token after left padding is not a target: it has no real context). The mean is
    over counted targets of the whole batch (token-mean); 0 if there are none.
    Deliberate vs upstream ReFINE: fla's DeltaNet class counted pad/eos targets.
    """
    if mask is None:
        mask = torch.ones_like(ids)
    valid = _ntp_valid(mask)
    # Only counted positions are picked: pads' logits (even -inf/NaN) get no gradient.
    ce = F.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid].long(), reduction="sum")
    return ce / valid.sum().clamp(min=1)


def _ce_sum(h: torch.Tensor, w, b: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    logits = (w(h) if isinstance(w, torch.nn.Module) else F.linear(h, w, b)).float()
    return F.cross_entropy(logits, y, reduction="sum")


def ntp_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    ids: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    lm_head_bias: Optional[torch.Tensor] = None,
    min_calls: int = 0,
    targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`ntp_loss` of ``hidden @ lm_head_weight.T`` without materialising ``[T, V]``.

    ``targets``: ``[B, T]`` bool, token t counts as a target only where it is True (e.g. a loss
    on the answers only, as the Zoology recall benchmarks train); None: every real token.

    ``lm_head_weight`` may also be the LM head module itself: it is then called rather
    than its weight read, which ZeRO-3 needs (it gathers partitioned weights in module hooks).
    Only counted target positions are projected, ``chunk_size`` rows at a time; each
    chunk's logits are recomputed in backward (activation checkpointing), so peak
    extra memory is ``[chunk_size, V]``. Same loss and gradients (w.r.t. hidden and
    the LM head) as the plain version, up to float rounding.

    ``min_calls``: project at least this many chunks, the extra ones empty. Under ZeRO-3
    every head call is a collective gather, so ranks agree on the most chunks any of them
    needs (:func:`head_calls`) and all make that many calls, whatever their lengths.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if mask is None:
        mask = torch.ones_like(ids)
    valid = _ntp_valid(mask)
    if targets is not None:
        valid = valid & targets[:, 1:].bool()
    h = hidden[:, :-1][valid]  # [M, D]
    y = ids[:, 1:][valid].long()
    n = h.shape[0]
    weight = lm_head_weight.weight if isinstance(lm_head_weight, torch.nn.Module) else lm_head_weight
    total = hidden[:0].sum().float()   # 0, in the graph of hidden even when nothing is counted
    for c in range(max(head_calls(n, chunk_size), min_calls)):
        hc, yc = h[c * chunk_size : (c + 1) * chunk_size], y[c * chunk_size : (c + 1) * chunk_size]
        if torch.is_grad_enabled() and (hc.requires_grad or weight.requires_grad):
            total = total + checkpoint(_ce_sum, hc, lm_head_weight, lm_head_bias, yc, use_reentrant=False)
        else:
            total = total + _ce_sum(hc, lm_head_weight, lm_head_bias, yc)
    return total / max(n, 1)


def head_calls(targets: int, chunk_size: int = 1024) -> int:
    """LM-head calls :func:`ntp_loss_from_hidden` makes for ``targets`` counted positions."""
    return -(-targets // chunk_size)


def micro_batch_token_mean_weights(token_counts, micro_batch_size: int) -> torch.Tensor:
    """Per-document weights that turn per-document mean losses into a token-mean per micro-batch.

    ``token_counts``: ``[D]`` the tokens each document's loss counts (NTP targets, answer tokens),
    documents in micro-batch order: micro-batch j holds documents ``j*m .. j*m+m-1`` (the last one
    may be shorter). Returns float64 ``[D]`` weights ``w`` with, for per-document means ``L``,

        mean_d(w_d * L_d) == mean_j(sum_{d in j} T_d * L_d / sum_{d in j} T_d)

    i.e. the cross-entropy pooled over each micro-batch's tokens, then averaged over
    micro-batches: verl's ``token-mean`` of one micro-batch (upstream ReFINE's HF loss over
    ``ttt_ppo_micro_batch_size_per_gpu`` documents) divided by the gradient-accumulation count.
    ``w_d = (D / n_micro) * T_d / T_j``; 0 for a micro-batch without tokens. With
    ``micro_batch_size`` 1 every document with tokens weighs 1 (seq-mean-token-mean).
    Raises ValueError for ``micro_batch_size <= 0`` or a negative count.
    """
    counts = torch.as_tensor(token_counts, dtype=torch.float64).reshape(-1)
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
    if (counts < 0).any():
        raise ValueError(f"token counts must be >= 0, got {counts.tolist()}")
    n = counts.numel()
    if n == 0:
        return counts
    micro = torch.arange(n) // micro_batch_size
    n_micro = int(micro[-1]) + 1
    pooled = torch.zeros(n_micro, dtype=torch.float64).index_add_(0, micro, counts)[micro]
    return torch.where(pooled > 0, (n / n_micro) * counts / pooled.clamp(min=1.0), torch.zeros_like(counts))


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL estimate of KL(pi || ref) from samples of pi (verl's estimators).

    ``k1``/``kl``: ``logp - ref``; ``abs``: ``|logp - ref|``; ``k2``/``mse``:
    ``0.5 (logp - ref)^2``; ``k3``/``low_var_kl``: ``exp(ref-logp) - (ref-logp) - 1``
    with ``ref-logp`` clamped to [-20, 20] and the result to [-10, 10] (as verl).
    """
    d = logp.float() - ref_logp.float()
    if kind in ("k1", "kl"):
        return d
    if kind == "abs":
        return d.abs()
    if kind in ("k2", "mse"):
        return 0.5 * d * d
    if kind in ("k3", "low_var_kl"):
        x = torch.clamp(-d, -20.0, 20.0)
        return torch.clamp(torch.exp(x) - x - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown kl kind {kind!r}; expected k1/kl, abs, k2/mse, k3/low_var_kl")


def refine_loss(
    ntp: torch.Tensor,
    pg: torch.Tensor,
    kl: Optional[torch.Tensor] = None,
    c_ntp: float = 1.0,
    c_pg: float = 0.2,
    c_kl: float = 0.0,
) -> torch.Tensor:
    """``c_ntp * ntp + c_pg * pg + c_kl * kl`` (scalars). ``kl`` is required iff ``c_kl != 0``.

    Upstream ReFINE's defaults: c_ntp = 1 (``ttt_sft_loss_coef``), c_pg = 0.2 (mid/post-training;
    0.4 at test time), no KL.
    """
    loss = c_ntp * ntp + c_pg * pg
    if c_kl != 0.0:
        if kl is None:
            raise ValueError("c_kl != 0 but no kl term given")
        loss = loss + c_kl * kl
    return loss

"""A step-comparable learning signal: next-sequence evaluation at FIXED cuts with FIXED seeds.

The training reward (``train_cuts/*``) is measured at entropy-selected cuts, which move to
wherever the policy is still uncertain, so it is not comparable from step to step (issue 15:
flat 0.44 -> 0.45 while the fixed-cut reward rose 0.44 -> 0.66). Here every document gets
``num_cuts`` uniform cuts past ``refine.min_prefix`` drawn once from seeds keyed by
(run seed, :data:`EVAL_STEP`, document index), and its G samples per cut are keyed by
(run seed, :data:`EVAL_STEP`, document, cut, sample) (refine_ray.refine.seeding): the same
cuts and the same uniforms at every evaluation, so only the weights change the numbers.

Metrics (``prefix`` + name; rows pooled over documents):

* ``ntp_loss``: mean next-token loss (nats) per document;
* ``nsp_exact``: fraction of the k sampled tokens equal to the true ones;
* ``nsp_exact_greedy`` / ``nsp_exact_greedy_seq``: greedy k-token continuation, fraction of
  tokens / of whole sequences equal to the truth;
* ``nsp_cosine_policy``: the paper's reward (policy hidden states at the samples vs at the
  truth), ``nsp_cosine_policy_random``: the same for uniformly random tokens (a control: a
  reward that rises for random tokens is being raised by collapse, not prediction);
* ``nsp_cosine_frozen`` / ``nsp_cosine_frozen_random``: the same cosines on the frozen
  reference model's hidden states (when one is given): the collapse-proof reward;
* ``nsp_cosine_encoder``: frozen sentence-encoder cosine (when an encoder rewarder is given);
* ``hidden_pair_cosine``, ``cut_entropy``, ``distinct_token_frac``: the collapse indicators
  (refine_ray.refine.collapse) on these documents, cuts and samples;
  ``truth_distinct_token_frac``: the distinct-token fraction of the true continuations, each
  repeated G times (what a perfect sampler would score: the yardstick for the one above).

Number to watch: ``nsp_exact_greedy`` and ``nsp_cosine_frozen`` beside ``ntp_loss``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch

from refine_ray.algo import cosine_reward, exact_match_reward
from refine_ray.config import RefineConfig
from refine_ray.refine.collapse import collapse_metrics, distinct_token_fraction, unrelated_position_pairs
from refine_ray.refine.frozen_reference import continuation_hidden, reference_hidden
from refine_ray.refine.sampling import continuation_seeds, sample_at_cuts
from refine_ray.refine.scoring import min_document_tokens, score_document
from refine_ray.refine.seeding import cut_seed, row_seed
from refine_ray.refine.sequence_logprobs import document_ntp_loss

EVAL_STEP = 2 ** 31 - 1        # the step key of every evaluation: never a training step's
RANDOM_STREAM = 3              # seed stream of the random-token control (seeding: 1 cuts, 2 rollout)


def eval_config(cfg: RefineConfig, num_cuts: int) -> RefineConfig:
    """``cfg`` with ``num_cuts`` uniform cuts (the evaluation's cut rule; k, G, temperature,
    top_p and min_prefix as in training)."""
    return replace(cfg, n_chunks=num_cuts, cut_strategy="uniform")


@torch.no_grad()
def evaluate_fixed_cuts(model, docs: Sequence[torch.Tensor], cfg: RefineConfig, seed: int = 0,
                        num_cuts: int = 8, reference=None, rewarder=None, num_pairs: int = 64,
                        prefix: str = "val/", with_ntp: bool = True) -> dict[str, float]:
    """Next-sequence metrics of ``model`` on ``docs`` (1-D long token ids) at fixed cuts (module doc).

    Args:
        cfg: the run's ``refine`` section (k = ``response_length``, G = ``samples_per_prefix``,
            ``temperature``, ``top_p``, ``min_prefix``); its cut strategy and n are replaced.
        seed: the run seed (cuts and samples are keyed by it and :data:`EVAL_STEP`).
        reference: the frozen reference model (initial weights) for ``nsp_cosine_frozen*``.
        rewarder: a :class:`~refine_ray.refine.rewarding.SequenceRewarder` with
            ``source='encoder'`` for ``nsp_cosine_encoder`` (None: not computed).
        num_pairs: unrelated position pairs for ``hidden_pair_cosine`` (fixed by ``seed``).
        with_ntp: also ``ntp_loss`` (False when the caller has it, e.g. from the learner).

    Returns floats keyed ``prefix + name`` plus ``prefix + 'nsp_docs'`` (documents long enough
    for ``num_cuts`` cuts; shorter ones count only in ``ntp_loss``; ``ntp_loss`` is the mean of
    the per-document mean losses). Source: the REFINE
    paper's rewards and k-token exact match; fixed cuts and seeds are our addition (issue 15).
    Raises ValueError when no document has 2 tokens.
    """
    ecfg = eval_config(cfg, num_cuts)
    k, G, device = ecfg.response_length, ecfg.samples_per_prefix, next(model.parameters()).device
    docs = [d.to(device).long() for d in docs if d.numel() >= 2]
    if not docs:
        raise ValueError("evaluate_fixed_cuts: no document with at least 2 tokens")
    hidden, ntp = [], []
    for ids in docs:
        h = model.forward_segment(ids[None], None, return_logits=False).hidden[0]
        hidden.append(h)
        if with_ntp:
            ntp.append(float(document_ntp_loss(model, ids, hidden=h)))
    parts: dict[str, list[torch.Tensor]] = {}

    def add(name: str, value: torch.Tensor) -> None:
        parts.setdefault(name, []).append(value.cpu())

    vocab = model.lm_head.weight.shape[0]
    for d, ids in enumerate(docs):
        if ids.numel() < min_document_tokens(ecfg):
            continue
        gen = torch.Generator(device=device).manual_seed(cut_seed(seed, EVAL_STEP, d))
        score = score_document(model, ids, ecfg, generator=gen, with_states=True, states_device=None)
        n = score.cuts.numel()
        sampled = sample_at_cuts(model, score.cut_states, score.cut_hidden, k, G, ecfg.temperature, ecfg.top_p,
                                 continuation_seeds(seed, EVAL_STEP, d, n, G))
        greedy = sample_at_cuts(model, score.cut_states, score.cut_hidden, k, 1, 0.0, 1.0,
                                continuation_seeds(seed, EVAL_STEP, d, n, 1))
        rand_gen = torch.Generator().manual_seed(row_seed(seed, RANDOM_STREAM, EVAL_STEP, d))
        random_tokens = torch.randint(vocab, (n * G, k), generator=rand_gen).to(device)
        truth = score.gt_ids.repeat_interleave(G, 0)
        gt_hidden = score.gt_hidden.repeat_interleave(G, 0)
        add("nsp_exact", exact_match_reward(sampled.tokens, truth))
        greedy_match = (greedy.tokens == score.gt_ids).float()
        add("nsp_exact_greedy", greedy_match.mean(1))
        add("nsp_exact_greedy_seq", greedy_match.min(1).values)
        add("nsp_cosine_policy", cosine_reward(sampled.hidden, gt_hidden))
        random_hidden = continuation_hidden(model, score.cut_states, random_tokens, G)
        add("nsp_cosine_policy_random", cosine_reward(random_hidden, gt_hidden))
        if reference is not None:
            ref_resp, ref_true = reference_hidden(reference, ids, score.cuts, sampled.tokens, G)
            add("nsp_cosine_frozen", cosine_reward(ref_resp, ref_true.repeat_interleave(G, 0)))
            ref_rand, _ = reference_hidden(reference, ids, score.cuts, random_tokens, G)
            add("nsp_cosine_frozen_random", cosine_reward(ref_rand, ref_true.repeat_interleave(G, 0)))
        if rewarder is not None:
            add("nsp_cosine_encoder", rewarder(sampled.tokens, score.gt_ids).components["cosine"])
        add("cut_entropy", score.cut_entropy)
        add("sample_tokens", sampled.tokens)
        add("truth_tokens", truth)
    out = {prefix + "nsp_docs": float(len(parts.get("cut_entropy", [])))}
    if with_ntp:
        out[prefix + "ntp_loss"] = sum(ntp) / len(ntp)
    if not parts:
        return out
    pairs = unrelated_position_pairs([h.shape[0] for h in hidden], num_pairs, seed, min_prefix=ecfg.min_prefix)
    indicators = collapse_metrics(hidden, pairs, torch.cat(parts.pop("cut_entropy")),
                                  torch.cat(parts.pop("sample_tokens")))
    for name, value in indicators.items():
        out[prefix + name] = value
    out[prefix + "truth_distinct_token_frac"] = distinct_token_fraction(torch.cat(parts.pop("truth_tokens")))
    for name, values in parts.items():
        out[prefix + name] = float(torch.cat(values).double().mean())     # pooled over rows
    return out

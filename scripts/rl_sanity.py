"""RL sanity harness (issue 15 point 4, issue 24 point 5): does REFINE's RL half learn, where, and by
prediction or by collapse?

One command, fixed seeds, one process through the refine/ pipeline (LocalRefineStep) on a tiny
model (``--model``: delta_net by default, any registry type) and a few fixed gov_report documents:

    nice .venv/bin/python scripts/rl_sanity.py            # writes outputs/rl_sanity/
    nice .venv/bin/python scripts/rl_sanity.py --fixed-cuts --k 1 --samples 16 --variants pg_exact

Warm start: ``warmup`` NTP steps from the seeded random initialisation (shared by every variant),
because from random weights PG alone does not move the policy at all (120 PG-only steps: entropy at
the cuts 6.49 -> 6.45 nats of a uniform 6.50, docs/results.md); REFINE trains a model that already
predicts. The frozen reference is the warm-started model (the RL phase's initial weights).

Variants (same warm-started weights, same documents, same seeds, AdamW):
    pg_frozen   PG only (ntp_coef 0, pg_coef 1), reward = cosine on the FROZEN initial model's hidden states
    pg_frozen_lowlr  the same at a tenth of the learning rate
    pg_policy   PG only, reward = cosine on the policy's own hidden states (the paper's reward)
    mix_frozen  the paper's mix NTP 1 + PG 0.2, frozen-reference reward
    mix_policy  the paper's mix NTP 1 + PG 0.2, policy reward (the paper)
    ntp         NTP only
    pg_exact, pg_exact_lowlr  PG only on the exact-match reward (not run by default; ``--variants``)

Where it measures. TRAINED cuts: ``n_chunks`` per document, entropy-selected afresh every step
(the product's rule), or with ``fixed_cuts`` drawn once (uniform, keyed by the run seed and
:data:`TRAIN_CUT_STEP`) and held (``LocalRefineStep.collect(cuts=...)``), the samples fresh every
step. Every step logs at its own cuts ``before/p_truth`` / ``after/p_truth`` (mean over cuts of the probability of the whole true k-token
continuation, teacher-forced, temperature 1, before / after the step; ``*/p_truth_token`` per
token), ``sampled_match`` (fraction of sampled tokens equal to the true ones) and
``zero_adv_groups`` (fraction of cuts whose G rewards are all equal: advantage 0, no gradient).
HELD-OUT cuts, other positions: every ``eval_every`` steps, ``eval_cuts`` fixed uniform cuts per
document keyed by the evaluation's step key (refine_ray.refine.heldout.evaluate_fixed_cuts: rewards
by type, greedy exact match, collapse indicators) plus ``p_truth`` / ``p_truth_token`` there; with
``fixed_cuts`` also ``trained_p_truth*`` (and per cut) at the trained cuts. Writes results.json,
results.md (tables) and curves.png (matplotlib, Agg).

Speed: the documents' tokens are renumbered onto the vocabulary they use (a few hundred
WordPiece ids instead of 30,522), which makes the LM head -- ~90% of the time with the full
vocabulary -- ~15x cheaper; nothing else changes (the model never sees the other ids).

The checks (:func:`checks`, bounds fixed before any run, documented in docs/results.md):
    pg_frozen and pg_frozen_lowlr: the frozen-reference reward at the end (mean of the last two
        evaluations) is at least 0.02 above its start (first ">": passed on noise); collapse indicators
        within bounds: unrelated-position hidden cosine at most +0.15 over its start, sampled
        distinct-token fraction at least half that of the true continuations, NTP loss at most +1 nat
        over its start.
    every PG-only variant with fixed_cuts: p(truth) at the trained cuts at the end >= its start + 0.1.
    mix vs ntp (same reward source): at the end the mix's NTP loss is at most 0.3 nats above NTP-only's
        and its greedy exact match at most 0.1 below.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import pyarrow.parquet as pq
import torch

from refine_ray.algo import gather_targets
from refine_ray.config import RefineConfig
from refine_ray.data import load_tokenizer
from refine_ray.models import registry
from refine_ray.refine.heldout import EVAL_STEP, eval_config, evaluate_fixed_cuts
from refine_ray.refine.local_step import LocalRefineStep
from refine_ray.refine.scoring import score_document
from refine_ray.refine.seeding import cut_seed
from refine_ray.refine.sequence_logprobs import document_logprobs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench" / "gov_report_16384.parquet"
TRAIN_CUT_STEP = EVAL_STEP - 1    # step key of the fixed training cuts: never a training step's, not the evaluation's

# name -> (ntp_coef, pg_coef, reward, reward_source, mode, learning-rate factor)
VARIANTS = {
    "pg_frozen": (0.0, 1.0, "cosine", "frozen", "refine", 1.0),
    "pg_frozen_lowlr": (0.0, 1.0, "cosine", "frozen", "refine", 0.1),
    "pg_exact": (0.0, 1.0, "exact", "policy", "refine", 1.0),
    "pg_exact_lowlr": (0.0, 1.0, "exact", "policy", "refine", 0.1),
    "pg_policy": (0.0, 1.0, "cosine", "policy", "refine", 1.0),
    "mix_frozen": (1.0, 0.2, "cosine", "frozen", "refine", 1.0),
    "mix_policy": (1.0, 0.2, "cosine", "policy", "refine", 1.0),
    "ntp": (1.0, 0.0, "cosine", "policy", "ntp", 1.0),
}
DEFAULT_VARIANTS = ("pg_frozen", "pg_frozen_lowlr", "pg_policy", "mix_frozen", "mix_policy", "ntp")  # 268 s CPU
# Bounds of the checks (fixed before the first run; see the module docstring).
MIN_REWARD_RISE = 0.02     # was "> start": that passed on evaluation noise (small case, 30 steps)
MAX_PAIR_COSINE_RISE = 0.15
MIN_DISTINCT_VS_TRUTH = 0.5
MAX_PG_NTP_RISE = 1.0
MIN_TRAINED_P_TRUTH_RISE = 0.1
MIX_NTP_LOSS_MARGIN = 0.3
MIX_EXACT_MARGIN = 0.1


@dataclass
class Setup:
    """The harness's sizes; the defaults are the documented run (268 s of CPU on one thread)."""
    model: str = "delta_net"      # registry type, tiny preset
    docs: int = 4                 # first gov_report documents (report text, instruction line dropped)
    tokens: int = 512             # tokens per document
    warmup: int = 60              # NTP steps before the variants branch (shared)
    steps: int = 120
    eval_every: int = 10
    eval_cuts: int = 8            # fixed uniform cuts per document at evaluation
    n_chunks: int = 4             # n: training cuts per document
    samples: int = 4              # G
    k: int = 5                    # response_length
    lr: float = 1e-3
    seed: int = 0
    fixed_cuts: bool = False      # hold the training cuts fixed (uniform, drawn once) instead of entropy cuts per step
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))


def load_documents(setup: Setup) -> tuple[list[torch.Tensor], int]:
    """The first ``setup.docs`` gov_report reports as ``[tokens]`` long tensors renumbered onto the
    ids they use, and that vocabulary's size. Raises ValueError when a document is too short."""
    tok = load_tokenizer()
    rows = pq.read_table(DATA, columns=["prompt"]).slice(0, setup.docs).to_pylist()
    docs = []
    for i, row in enumerate(rows):
        ids = tok(row["prompt"].split("Report:\n", 1)[-1], add_special_tokens=False)["input_ids"][:setup.tokens]
        if len(ids) < setup.tokens:
            raise ValueError(f"{DATA} row {i}: {len(ids)} tokens, setup.tokens={setup.tokens} expected")
        docs.append(torch.tensor(ids))
    vocab = torch.unique(torch.cat(docs))
    lut = torch.full((int(vocab.max()) + 1,), -1, dtype=torch.long)
    lut[vocab] = torch.arange(vocab.numel())
    return [lut[d] for d in docs], vocab.numel()


def refine_config(setup: Setup, variant: str) -> RefineConfig:
    """The variant's ``refine`` section (entropy cuts, or uniform ones with ``fixed_cuts``; temperature 1
    as the paper)."""
    ntp_coef, pg_coef, reward, source, _, _ = VARIANTS[variant]
    return RefineConfig(n_chunks=setup.n_chunks, response_length=setup.k, samples_per_prefix=setup.samples,
                        ntp_coef=ntp_coef, pg_coef=pg_coef, reward=reward, reward_source=source,
                        cut_strategy="uniform" if setup.fixed_cuts else "entropy")


def warm_start(setup: Setup, docs: list[torch.Tensor], vocab: int) -> dict:
    """The state dict after ``setup.warmup`` NTP steps (AdamW, ``setup.lr``) from the seeded init."""
    model = registry.build_model(setup.model, seed=setup.seed, vocab_size=vocab)
    step = LocalRefineStep(model, torch.optim.AdamW(model.parameters(), lr=setup.lr), refine_config(setup, "ntp"),
                           seed=setup.seed)
    for _ in range(setup.warmup):
        step.step(docs, mode="ntp")
    return copy.deepcopy(model.state_dict())


def cuts_keyed_by(model, docs: list[torch.Tensor], cfg: RefineConfig, seed: int, step_key: int) -> list[torch.Tensor]:
    """Per document the ``[n]`` cuts :func:`score_document` draws under ``cfg`` with the generator keyed
    by (``seed``, ``step_key``, document): with uniform cuts they do not depend on the weights, so
    ``step_key`` :data:`EVAL_STEP` and ``eval_config`` give evaluate_fixed_cuts's cuts."""
    return [score_document(model, ids, cfg, generator=torch.Generator().manual_seed(cut_seed(seed, step_key, d))).cuts
            for d, ids in enumerate(docs)]


@torch.no_grad()
def truth_logprobs(model, docs: list[torch.Tensor], cuts: list[torch.Tensor], k: int) -> torch.Tensor:
    """``[sum n, k]`` float32 log-probs (temperature 1, teacher-forced) of the true k tokens after every cut."""
    rows = []
    for ids, c in zip(docs, cuts):
        truth, _ = gather_targets(ids, None, c, k)
        rows.append(document_logprobs(model, ids, c, truth, 1, 1.0, with_ntp=False).logprobs)
    return torch.cat(rows)


def truth_metrics(logprobs: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """From ``logprobs [n, k]`` (:func:`truth_logprobs`): ``p_truth``, the mean over cuts of the
    probability of the whole true continuation, and ``p_truth_token``, the mean per-token probability
    (the same for k = 1; at k = 5 the first is ~p^5, too small to read)."""
    return {f"{prefix}p_truth": float(logprobs.sum(1).exp().mean()),
            f"{prefix}p_truth_token": float(logprobs.exp().mean())}


def run_variant(setup: Setup, variant: str, docs: list[torch.Tensor], vocab: int, start: dict,
                log=print) -> dict:
    """Train one variant for ``setup.steps`` steps from the weights ``start`` (a fresh AdamW);
    returns {'train': [per-step metrics], 'eval': [per-evaluation metrics with 'step']} (module doc)."""
    model = registry.build_model(setup.model, seed=setup.seed, vocab_size=vocab)
    model.load_state_dict(start)
    reference = copy.deepcopy(model).eval().requires_grad_(False)       # the RL phase's initial weights
    cfg = refine_config(setup, variant)
    opt = torch.optim.AdamW(model.parameters(), lr=setup.lr * VARIANTS[variant][5])
    step = LocalRefineStep(model, opt, cfg, seed=setup.seed, reference=reference)
    eval_cfg = replace(cfg, reward="cosine", reward_source="frozen", cut_strategy="uniform")
    eval_cuts = cuts_keyed_by(model, docs, eval_config(eval_cfg, setup.eval_cuts), setup.seed, EVAL_STEP)
    trained_cuts = cuts_keyed_by(model, docs, cfg, setup.seed, TRAIN_CUT_STEP) if setup.fixed_cuts else None
    k, G = setup.k, setup.samples
    history: dict[str, list] = {"train": [], "eval": []}
    for s in range(setup.steps + 1):
        if s % setup.eval_every == 0 or s == setup.steps:
            m = evaluate_fixed_cuts(model, docs, eval_cfg, seed=setup.seed, num_cuts=setup.eval_cuts,
                                    reference=reference, prefix="")
            m.update(truth_metrics(truth_logprobs(model, docs, eval_cuts, k)))
            line = ""
            if trained_cuts is not None:
                lp = truth_logprobs(model, docs, trained_cuts, k)
                m.update(truth_metrics(lp, "trained_"), trained_p_truth_cuts=lp.sum(1).exp().tolist())
                line = f"  trained p_truth {m['trained_p_truth']:.3g} (token {m['trained_p_truth_token']:.3f})"
            history["eval"].append({"step": s, **m})
            log(f"{variant:>10} step {s:4d}  ntp {m['ntp_loss']:.3f}  frozen {m['nsp_cosine_frozen']:.3f}  "
                f"policy {m['nsp_cosine_policy']:.3f}  greedy {m['nsp_exact_greedy']:.3f}  "
                f"pair_cos {m['hidden_pair_cosine']:.3f}  H {m['cut_entropy']:.2f}  "
                f"distinct {m['distinct_token_frac']:.3f}  p_truth {m['p_truth']:.3g} "
                f"(token {m['p_truth_token']:.3f}){line}", flush=True)
        if s == setup.steps:
            break
        if VARIANTS[variant][4] == "ntp":
            history["train"].append({"step": s, **step.step(docs, mode="ntp")})
            continue
        exp = step.collect(docs, range(len(docs)), cuts=trained_cuts)     # trained_cuts None: drawn per step
        truth = torch.cat([gather_targets(ids, None, c, k)[0] for ids, c in zip(docs, exp.cuts)])
        metrics = truth_metrics(truth_logprobs(model, docs, exp.cuts, k), "before/")
        metrics.update(step.update(docs, exp))
        step.step_index += 1                  # as LocalRefineStep.step does after its update
        metrics.update(truth_metrics(truth_logprobs(model, docs, exp.cuts, k), "after/"))
        metrics.update(sampled_match=float((exp.responses == truth.repeat_interleave(G, 0)).float().mean()),
                       zero_adv_groups=float((exp.advantages.view(-1, G) == 0).all(1).float().mean()))
        history["train"].append({"step": s, **metrics})
    history["cuts"] = {"eval": [c.tolist() for c in eval_cuts]}
    if trained_cuts is not None:
        history["cuts"]["trained"] = [c.tolist() for c in trained_cuts]
    return history


def _end(evals: list[dict], key: str) -> float:
    """Mean of the last two evaluations (one evaluation is a handful of samples)."""
    return sum(e[key] for e in evals[-2:]) / len(evals[-2:])


def checks(results: dict) -> dict[str, dict]:
    """The harness's pass/fail checks (bounds in the module docstring) with the numbers compared."""
    out = {}
    for pg in ("pg_frozen", "pg_frozen_lowlr"):
        if pg not in results:
            continue
        ev = results[pg]["eval"]
        start = ev[0]
        out[f"{pg} raises the frozen reward"] = {
            "start": start["nsp_cosine_frozen"], "end": _end(ev, "nsp_cosine_frozen"),
            "pass": _end(ev, "nsp_cosine_frozen") >= start["nsp_cosine_frozen"] + MIN_REWARD_RISE}
        worst_pair = max(e["hidden_pair_cosine"] for e in ev)
        out[f"{pg} hidden pair cosine rise <= 0.15"] = {
            "start": start["hidden_pair_cosine"], "max": worst_pair,
            "pass": worst_pair - start["hidden_pair_cosine"] <= MAX_PAIR_COSINE_RISE}
        ratio = min(e["distinct_token_frac"] / e["truth_distinct_token_frac"] for e in ev)
        out[f"{pg} distinct tokens >= 0.5 x truth's"] = {"min_ratio": ratio, "pass": ratio >= MIN_DISTINCT_VS_TRUTH}
        worst_ntp = max(e["ntp_loss"] for e in ev)
        out[f"{pg} NTP loss rise <= 1 nat"] = {"start": start["ntp_loss"], "max": worst_ntp,
                                               "pass": worst_ntp - start["ntp_loss"] <= MAX_PG_NTP_RISE}
    for name, hist in results.items():
        ev = hist["eval"]
        if VARIANTS[name][0] == 0 and "trained_p_truth" in ev[0]:
            out[f"{name} raises p(truth) at the trained cuts by >= 0.1"] = {
                "start": ev[0]["trained_p_truth"], "end": _end(ev, "trained_p_truth"),
                "pass": _end(ev, "trained_p_truth") >= ev[0]["trained_p_truth"] + MIN_TRAINED_P_TRUTH_RISE}
    for mix in ("mix_frozen", "mix_policy"):
        if mix in results and "ntp" in results:
            a, b = results[mix]["eval"], results["ntp"]["eval"]
            out[f"{mix} NTP loss <= ntp + 0.3"] = {
                "mix": _end(a, "ntp_loss"), "ntp": _end(b, "ntp_loss"),
                "pass": _end(a, "ntp_loss") <= _end(b, "ntp_loss") + MIX_NTP_LOSS_MARGIN}
            out[f"{mix} greedy exact >= ntp - 0.1"] = {
                "mix": _end(a, "nsp_exact_greedy"), "ntp": _end(b, "nsp_exact_greedy"),
                "pass": _end(a, "nsp_exact_greedy") >= _end(b, "nsp_exact_greedy") - MIX_EXACT_MARGIN}
    return out


TABLE_KEYS = ("ntp_loss", "nsp_cosine_frozen", "nsp_cosine_frozen_random", "nsp_cosine_policy",
              "nsp_cosine_policy_random", "nsp_exact", "nsp_exact_greedy", "hidden_pair_cosine", "cut_entropy",
              "distinct_token_frac", "p_truth", "p_truth_token", "trained_p_truth", "trained_p_truth_token")
STEP_KEYS = ("before/p_truth", "after/p_truth", "before/p_truth_token", "after/p_truth_token", "sampled_match",
             "zero_adv_groups")


def _fmt(key: str, value: float, digits: int = 3) -> str:
    """Whole-continuation probabilities in significant digits (~1e-7 at k=5), the rest in fixed decimals."""
    return f"{value:.{digits}g}" if key.endswith("p_truth") else f"{value:.{digits}f}"


def markdown(results: dict, setup: Setup, check: dict) -> str:
    """Tables: held-out (and, with fixed cuts, trained-cut) metrics start -> end (min..max over
    evaluations) per variant; per-step metrics at the trained cuts; the checks."""
    keys = [key for key in TABLE_KEYS if key in next(iter(results.values()))["eval"][0]]
    lines = [f"Setup: {json.dumps(asdict(setup))}", "",
             "| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, hist in results.items():
        ev = hist["eval"]
        cells = [f"{_fmt(key, ev[0][key])} → {_fmt(key, ev[-1][key])} "
                 f"({_fmt(key, min(e[key] for e in ev), 2)}..{_fmt(key, max(e[key] for e in ev), 2)})" for key in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "At each step's own trained cuts (mean over steps; first step -> last step):", "",
              "| variant | " + " | ".join(STEP_KEYS) + " | steps that raise p_truth at their cuts |",
              "|---" * (len(STEP_KEYS) + 2) + "|"]
    for name, hist in results.items():
        tr = [t for t in hist["train"] if "before/p_truth" in t]
        if tr:
            cells = [f"{_fmt(key, sum(t[key] for t in tr) / len(tr))} "
                     f"({_fmt(key, tr[0][key])} → {_fmt(key, tr[-1][key])})" for key in STEP_KEYS]
            rises = sum(t["after/p_truth"] > t["before/p_truth"] for t in tr)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {rises} / {len(tr)} |")
    lines += ["", "| check | numbers | pass |", "|---|---|---|"]
    for name, c in check.items():
        nums = ", ".join(f"{k} {v:.3f}" for k, v in c.items() if k != "pass")
        lines.append(f"| {name} | {nums} | {'yes' if c['pass'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """One panel per held-out metric (rewards beside the collapse indicators) and one for the per-token
    p(truth) at the trained cuts (fixed cuts: at every evaluation; moving cuts: each step's own cuts,
    before the step), one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("nsp_cosine_frozen", "nsp_cosine_policy", "nsp_cosine_policy_random", "nsp_exact_greedy", "p_truth_token",
            "ntp_loss", "hidden_pair_cosine", "cut_entropy", "distinct_token_frac")
    fig, axes = plt.subplots(2, 5, figsize=(22, 8))
    for ax, key in zip(axes.flat, keys):
        for name, hist in results.items():
            ax.plot([e["step"] for e in hist["eval"]], [e[key] for e in hist["eval"]], label=name, marker=".")
        if key == "distinct_token_frac":    # what reproducing the truth would score
            first = next(iter(results.values()))["eval"]
            ax.plot([e["step"] for e in first], [e["truth_distinct_token_frac"] for e in first], "k--", label="truth")
        ax.set_title(f"{key} (held-out cuts)")
        ax.set_xlabel("step")
    ax = axes.flat[-1]
    for name, hist in results.items():
        if "trained_p_truth_token" in hist["eval"][0]:
            ax.plot([e["step"] for e in hist["eval"]], [e["trained_p_truth_token"] for e in hist["eval"]], label=name)
        elif "before/p_truth_token" in hist["train"][0]:
            ax.plot([t["step"] for t in hist["train"]], [t["before/p_truth_token"] for t in hist["train"]], label=name)
    ax.set_title("p_truth_token at the trained cuts")
    ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(setup: Setup, out: Path) -> dict:
    """Run every variant of ``setup``; write results.json, results.md and curves.png under ``out``."""
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    docs, vocab = load_documents(setup)
    start = warm_start(setup, docs, vocab)
    results = {}
    for variant in setup.variants:
        results[variant] = run_variant(setup, variant, docs, vocab, start)
    check = checks(results)
    (out / "results.json").write_text(json.dumps({"setup": asdict(setup), "vocab": vocab, "results": results,
                                                  "checks": check, "seconds": time.perf_counter() - t0}, indent=1))
    (out / "results.md").write_text(markdown(results, setup, check))
    plot(results, out / "curves.png")
    print((out / "results.md").read_text())
    print(f"{time.perf_counter() - t0:.0f} s; wrote {out}/results.json, results.md, curves.png")
    return {"results": results, "checks": check}


def parse_args(argv=None) -> tuple[Setup, Path]:
    """``--<field>`` for every :class:`Setup` field (``--fixed-cuts``, ``--k 1``, ``--variants a b``), ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    types = {"int": int, "float": float, "str": str}
    for f in fields(Setup):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "variants":
            parser.add_argument(flag, nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
        elif f.name == "model":
            parser.add_argument(flag, default=f.default, choices=registry.MODEL_TYPES)
        elif f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=types[f.type], default=f.default)
    parser.add_argument("--out", type=Path, default=Path("outputs/rl_sanity"))
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    return Setup(**args), out


if __name__ == "__main__":
    main(*parse_args())

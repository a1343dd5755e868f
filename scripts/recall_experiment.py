"""REFINE vs NTP at equal compute on multi-query associative recall (issue 15 point 5).

One command, fixed seeds; each seed runs in its own one-thread process:

    nice .venv/bin/python scripts/recall_experiment.py --jobs 3   # 3 seeds -> outputs/recall/, ~47 min on 2 cores

writes ``seed_<s>.json`` per seed (a finished seed is not rerun), then ``results.json``,
``results.md`` (the table: mean ± std over seeds) and ``recall.png``.

Task (every token after the separator is determined by memory, so a whole k-token
continuation is): ``P`` key-value pairs (a key token, then ``m`` value tokens), ``F`` filler
tokens, a separator, then the queries replaying the pairs in their order (the copy /
induction form of multi-query associative recall: each query token is recalled from what
followed its context in the key-value block). Keys 0-63 (distinct within a document), values
64-191, filler 192-254, separator 255. Training documents: P=16, m=2, F=0 (97 tokens).

Model: DeltaNet, vocabulary 256, hidden 128, 2 layers (refine_ray.models registry), AdamW 1e-3.

Protocol (fixed before the comparison was first run; the evaluation is never tuned to it):
  1. Pre-train with the loss on the answers only (the replayed value tokens, as the Zoology
     recall benchmarks train) until the held-out recall at the training length reaches 0.3
     (checked every 10 steps): partial recall. Layout probes before this protocol (one seed,
     not one of the experiment's): with the loss on every replayed token (keys too) or with
     64 filler tokens, recall stayed at chance for 300-700 steps; with the answers only and no
     filler it rose from chance to 0.89-0.98 between steps 300 and 400 (docs/results.md). The
     stopping check reads its own held-out documents (a development set), not the test ones.
  2. From that model and optimizer state, continue on the same documents, in the same order:
       ntp            answer-only NTP (the pre-training objective), and
       refine_exact   REFINE: the same NTP (coefficient 1) + 0.2 x GRPO/PPO-clip (the paper's
                      mix) at entropy-sampled cuts past the separator (``refine.min_prefix``),
                      n=4 cuts, G=8 samples of k=m+1 tokens, reward = exact match, the
                      fraction of the k tokens right (this task's own reward);
       refine_cosine  the same with refine-ray's default reward: hidden-state cosine read from the
                      frozen pre-trained model (``reward_source: frozen``).
     Equal optimizer steps and training tokens: every arm makes ``continue_steps`` steps on the
     same documents. Equal compute time: the NTP arm goes on until its process CPU time of
     training (one thread; evaluation excluded) reaches each REFINE arm's, and is evaluated
     there too (``ntp (equal CPU time of <arm>)``). CPU time rather than wall-clock, so that
     other work on the machine does not move the comparison; on an idle core the two agree.
  3. Evaluate on held-out documents (a separate seed stream): recall (teacher-forced greedy
     accuracy over the answers; all values of a query right; every replayed token, keys
     included) at P/F = 16/0 (training length), 16/64 and 16/256 (a gap of filler: longer than
     training) and 32/0 (more pairs: longer); the held-out NTP loss (answers, and the whole
     document); the fixed-cut next-sequence metrics of refine_ray.refine.heldout (uniform cuts
     past the separator, fixed seeds, ``val/``).
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from refine_ray.config import RefineConfig
from refine_ray.models import registry
from refine_ray.refine.heldout import evaluate_fixed_cuts
from refine_ray.refine.local_step import LocalRefineStep

KEYS, VALUES, FILLER, SEP = (0, 64), (64, 192), (192, 255), 255
TRAIN_STREAM, HELDOUT_STREAM, DEV_STREAM = 1, 2, 3     # document streams: disjoint seeds
# name -> (mode, reward, reward_source); all REFINE arms use NTP 1 + PG 0.2
ARMS = {"ntp": ("ntp", "exact", "policy"), "refine_exact": ("refine", "exact", "policy"),
        "refine_cosine": ("refine", "cosine", "frozen")}


@dataclass
class Setup:
    """Sizes of one seed's run; the defaults are the documented experiment."""
    seed: int = 0
    pairs: int = 16
    value_len: int = 2
    filler: int = 0
    batch: int = 16
    hidden: int = 128
    layers: int = 2
    lr: float = 1e-3
    pretrain_recall: float = 0.3     # pre-train until held-out recall reaches this (partial recall) ...
    max_pretrain_steps: int = 2000   # ... or this many steps
    pretrain_check_every: int = 10
    continue_steps: int = 150
    eval_every: int = 10
    n_chunks: int = 4
    samples: int = 8
    heldout_docs: int = 64           # per evaluation length
    val_docs: int = 16               # fixed-cut next-sequence evaluation (training length)
    eval_lengths: list[tuple[int, int]] = field(default_factory=lambda: [(16, 0), (16, 64), (16, 256), (32, 0)])
    arms: list[str] = field(default_factory=lambda: ["refine_exact", "refine_cosine", "ntp"])


def recall_document(rng: np.random.Generator, pairs: int, value_len: int, filler: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One document ``ids [L]`` long and its answer mask ``[L]`` bool (the value tokens after the
    separator), ``L = 2 * pairs * (1 + value_len) + filler + 1``. Raises ValueError for more pairs
    than keys."""
    if pairs > KEYS[1] - KEYS[0]:
        raise ValueError(f"pairs={pairs}: at most {KEYS[1] - KEYS[0]} distinct keys")
    keys = rng.choice(np.arange(*KEYS), size=pairs, replace=False)
    values = rng.integers(*VALUES, size=(pairs, value_len))
    block = np.concatenate([keys[:, None], values], 1).reshape(-1)
    ids = np.concatenate([block, rng.integers(*FILLER, size=filler), [SEP], block])
    answers = np.zeros(ids.size, dtype=bool)
    answers[-block.size:] = np.arange(block.size) % (1 + value_len) != 0
    return torch.from_numpy(ids).long(), torch.from_numpy(answers)


def documents(seed: int, stream: int, index: int, count: int, pairs: int, value_len: int,
              filler: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``count`` documents keyed by (seed, stream, index): the same for every arm and rerun."""
    rng = np.random.default_rng([seed, stream, index])
    made = [recall_document(rng, pairs, value_len, filler) for _ in range(count)]
    return [d for d, _ in made], [q for _, q in made]


def refine_config(setup: Setup, arm: str) -> RefineConfig:
    """The arm's ``refine`` section; cuts only past the separator (on the queries)."""
    _, reward, source = ARMS[arm]
    return RefineConfig(n_chunks=setup.n_chunks, response_length=setup.value_len + 1,
                        samples_per_prefix=setup.samples, ntp_coef=1.0, pg_coef=0.2, reward=reward,
                        reward_source=source, min_prefix=setup.pairs * (1 + setup.value_len) + setup.filler + 1)


@torch.no_grad()
def recall_metrics(model, docs: list[torch.Tensor], queries: list[torch.Tensor], value_len: int,
                   batch: int = 16) -> dict[str, float]:
    """Teacher-forced greedy recall on documents of one length (``answers``: their value masks):
    ``recall`` (accuracy over the value tokens: the answers), ``query_recall`` (all values of a
    query right), ``sequence_recall`` (accuracy over every token after the separator, the
    replayed keys included: what a k-token continuation must get right), ``query_ntp_loss`` and
    ``ntp_loss`` (nats, over the value tokens / the whole document)."""
    hits, seq_hits, losses, full = [], [], [], []
    for b in range(0, len(docs), batch):
        ids = torch.stack(docs[b:b + batch])
        mask = torch.stack(queries[b:b + batch])[:, 1:]
        block = int(mask[0].sum()) // value_len * (1 + value_len)           # the replayed tokens
        logits = model.forward_segment(ids, None, return_logits=True).logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        right = logits.argmax(-1) == ids[:, 1:]
        hits.append(right[mask].view(ids.shape[0], -1))
        seq_hits.append(right[:, -block:])
        losses.append(ce[mask])
        full.append(ce.mean(1))
    hits_all = torch.cat(hits).float()
    per_query = hits_all.view(hits_all.shape[0], -1, value_len).min(-1).values
    return {"recall": float(hits_all.mean()), "query_recall": float(per_query.mean()),
            "sequence_recall": float(torch.cat(seq_hits).float().mean()),
            "query_ntp_loss": float(torch.cat(losses).mean()), "ntp_loss": float(torch.cat(full).mean())}


def evaluate(model, setup: Setup, reference, full: bool) -> dict[str, float]:
    """Held-out recall at the training length (and, with ``full``, every evaluation length) and
    the fixed-cut next-sequence metrics (``val/``) at the training length."""
    out = {}
    lengths = setup.eval_lengths if full else setup.eval_lengths[:1]
    for pairs, filler in lengths:
        docs, queries = documents(setup.seed, HELDOUT_STREAM, pairs * 100_000 + filler, setup.heldout_docs,
                                  pairs, setup.value_len, filler)
        for name, value in recall_metrics(model, docs, queries, setup.value_len).items():
            out[f"P{pairs}_F{filler}/{name}"] = value
    docs, _ = documents(setup.seed, HELDOUT_STREAM, 0, setup.val_docs, setup.pairs, setup.value_len, setup.filler)
    cfg = refine_config(setup, "refine_cosine")
    out.update(evaluate_fixed_cuts(model, docs, cfg, seed=setup.seed, num_cuts=setup.n_chunks,
                                   reference=reference, prefix="val/"))
    return out


def _main_key(setup: Setup, name: str) -> str:
    pairs, filler = setup.eval_lengths[0]
    return f"P{pairs}_F{filler}/{name}"


def new_model(setup: Setup):
    """The seeded DeltaNet of the setup (fp32, CPU)."""
    return registry.build_model("delta_net", seed=setup.seed, vocab_size=256, hidden_size=setup.hidden,
                                num_hidden_layers=setup.layers)


def train_batch(setup: Setup, step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The training documents of global step ``step`` (pre-training and continuation count on)."""
    return documents(setup.seed, TRAIN_STREAM, step, setup.batch, setup.pairs, setup.value_len, setup.filler)


def pretrain(setup: Setup, log) -> tuple[dict, dict, list[dict]]:
    """Answer-only NTP steps until the held-out recall at the training length reaches
    ``pretrain_recall`` (checked every ``pretrain_check_every`` steps; recall rises in a sharp
    transition whose step varies by seed, so a fixed step count would start the arms at chance or
    at saturation) or ``max_pretrain_steps``: (model state, optimizer state, evaluations, steps)."""
    model = new_model(setup)
    opt = torch.optim.AdamW(model.parameters(), lr=setup.lr)
    step = LocalRefineStep(model, opt, refine_config(setup, "ntp"), seed=setup.seed)
    pairs, filler = setup.eval_lengths[0]
    heldout = documents(setup.seed, DEV_STREAM, pairs * 100_000 + filler, setup.heldout_docs, pairs,
                        setup.value_len, filler)
    evals, s = [], 0
    while s < setup.max_pretrain_steps:
        docs, queries = train_batch(setup, s)
        step.step(docs, mode="ntp", ntp_targets=queries)
        s += 1
        if s % setup.pretrain_check_every == 0:
            m = recall_metrics(model, *heldout, setup.value_len)
            evals.append({"step": s, **m})
            log(f"seed {setup.seed} pretrain {s:4d}  recall {m['recall']:.3f}  query-loss {m['query_ntp_loss']:.3f}")
            if m["recall"] >= setup.pretrain_recall:
                break
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), evals, s


def continue_arm(setup: Setup, arm: str, start: tuple[dict, dict, int], log,
                 time_marks: Optional[dict[str, float]] = None) -> dict:
    """Continue from ``start`` (model state, optimizer state, pre-training steps) with ``arm`` for ``continue_steps`` steps (the NTP arm: further, until
    its training CPU time passes every ``time_marks`` value). Returns evaluations by step, the
    final full evaluation ('final'), the training CPU seconds and, per time mark, a full
    evaluation at that time."""
    model = new_model(setup)
    model.load_state_dict(start[0])
    reference = copy.deepcopy(model).eval().requires_grad_(False)       # the pre-trained model
    opt = torch.optim.AdamW(model.parameters(), lr=setup.lr)
    opt.load_state_dict(copy.deepcopy(start[1]))   # load_state_dict keeps the tensors: AdamW would
                                                   # update the shared start state in place
    step = LocalRefineStep(model, opt, refine_config(setup, arm), seed=setup.seed, reference=reference)
    mode = ARMS[arm][0]
    marks = dict(time_marks or {})
    result: dict = {"evals": [], "at_time": {}, "train": []}
    cpu, s = 0.0, 0
    while True:
        # past continue_steps (the NTP arm running on to the REFINE arms' CPU time) the training
        # length is evaluated every 5 x eval_every steps, for the curve against CPU time
        if (s % setup.eval_every == 0 and s <= setup.continue_steps
                or s == setup.continue_steps
                or s > setup.continue_steps and s % (5 * setup.eval_every) == 0):
            m = {"step": s, "train_cpu_s": cpu,
                 **evaluate(model, setup, reference, full=s == setup.continue_steps)}
            result["evals"].append(m)
            if s == setup.continue_steps:
                result["final"] = m
            log(f"seed {setup.seed} {arm:>13} {s:4d}  recall {m[_main_key(setup, 'recall')]:.3f}  "
                f"nsp_greedy {m['val/nsp_exact_greedy']:.3f}  cpu {cpu:.0f}s")
        if s >= setup.continue_steps and (not marks or s >= 20 * setup.continue_steps):
            break
        docs, queries = train_batch(setup, start[2] + s)
        t0 = time.process_time()
        metrics = step.step(docs, mode=mode, ntp_targets=queries)
        cpu += time.process_time() - t0
        s += 1
        if s == 1 or s % 10 == 0:
            result["train"].append({"step": s, "train_cpu_s": cpu, **{
                k: v for k, v in metrics.items() if k.startswith(("train_cuts/", "pg_", "ntp_", "collapse/"))}})
        for name, mark in list(marks.items()):
            if cpu >= mark:
                result["at_time"][name] = {"step": s, "train_cpu_s": cpu,
                                           **evaluate(model, setup, reference, full=True)}
                del marks[name]
    return result


def run_seed(setup: Setup, out: Path) -> Path:
    """One seed's pre-training and arms; writes (and returns) ``out/seed_<s>.json``."""
    torch.set_num_threads(1)
    path = out / f"seed_{setup.seed}.json"
    if path.exists():
        return path
    log = lambda msg: print(msg, flush=True)     # noqa: E731
    t0 = time.time()
    state, opt_state, pre_evals, pre_steps = pretrain(setup, log)
    start = (state, opt_state, pre_steps)
    model = new_model(setup)
    model.load_state_dict(state)
    arms = {"start": {"final": {"step": 0, "train_cpu_s": 0.0, **evaluate(model, setup, model, full=True)}}}
    for arm in [a for a in setup.arms if a != "ntp"]:
        arms[arm] = continue_arm(setup, arm, start, log)
    if "ntp" in setup.arms:
        marks = {arm: r["final"]["train_cpu_s"] for arm, r in arms.items() if arm != "start"}
        arms["ntp"] = continue_arm(setup, "ntp", start, log, time_marks=marks)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"setup": asdict(setup), "pretrain": pre_evals, "pretrain_steps": pre_steps, "arms": arms,
                               "wall_s": time.time() - t0}))
    tmp.replace(path)
    log(f"seed {setup.seed} done in {time.time() - t0:.0f} s -> {path}")
    return path


def columns(setup: dict) -> list[tuple[str, str]]:
    """(metric key, column name) of the table: recall at every evaluation length, then the
    training length's whole-query recall and losses, the fixed-cut metrics, steps and CPU time."""
    main = "P{}_F{}".format(*setup["eval_lengths"][0])
    return ([(f"P{p}_F{f}/recall", f"recall {p}/{f}") for p, f in setup["eval_lengths"]]
            + [(f"{main}/query_recall", "whole queries"), (f"{main}/key_recall", "replayed keys"),
               (f"{main}/query_ntp_loss", "query NTP loss"),
               (f"{main}/ntp_loss", "document NTP loss"), ("val/nsp_exact_greedy", "val greedy exact"),
               ("val/nsp_exact", "val sampled exact"), ("val/nsp_cosine_frozen", "val frozen cosine"),
               ("val/hidden_pair_cosine", "pair cosine"), ("val/distinct_token_frac", "distinct tokens"),
               ("step", "steps"), ("train_cpu_s", "train CPU s")])


def rows(seeds: list[dict]) -> dict[str, list[dict]]:
    """Per table row, one evaluation per seed: the start, each arm at equal steps, and the NTP arm
    at each REFINE arm's training CPU time."""
    out: dict[str, list[dict]] = {}
    for run in seeds:
        main, m = "P{}_F{}".format(*run["setup"]["eval_lengths"][0]), run["setup"]["value_len"]
        for result in run["arms"].values():                 # key accuracy, from the replayed block's
            for ev in [result["final"], *result.get("at_time", {}).values()]:    # (1 key + m values)
                ev[f"{main}/key_recall"] = (1 + m) * ev[f"{main}/sequence_recall"] - m * ev[f"{main}/recall"]
        for arm, result in run["arms"].items():
            label = "pre-trained (start)" if arm == "start" else f"{arm} (equal steps)"
            out.setdefault(label, []).append(result["final"])
            for mark, ev in result.get("at_time", {}).items():
                out.setdefault(f"ntp (equal CPU time of {mark})", []).append(ev)
    return out


def _cell(values: list[float], key: str) -> str:
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    mean = round(mean, 3) + 0.0                                          # no "-0.000"
    if key in ("step", "train_cpu_s"):
        return f"{mean:.0f} ± {std:.0f}"
    return f"{mean:.3f} ± {std:.3f}"


def markdown(seeds: list[dict], command: str) -> str:
    """The results table (mean ± sample std over seeds) and the per-seed paired differences."""
    table, cols = rows(seeds), columns(seeds[0]["setup"])
    lines = [f"Command: `{command}`", "", f"Seeds: {[r['setup']['seed'] for r in seeds]}; setup: "
             f"{json.dumps({k: v for k, v in seeds[0]['setup'].items() if k != 'seed'})}", "",
             "| run | " + " | ".join(name for _, name in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, evs in table.items():
        cells = [_cell([e[key] for e in evs], key) if all(key in e for e in evs) else "-" for key, _ in cols]
        lines.append(f"| {label} (n={len(evs)}) | " + " | ".join(cells) + " |")
    paired = [c for c in cols if c[0].endswith(("/recall", "query_ntp_loss")) or c[0] == "val/nsp_exact_greedy"]
    keys = [key for key, _ in paired]
    lines += ["", "Paired differences, REFINE arm minus NTP arm, per seed then mean ± std:", "",
              "| comparison | " + " | ".join(name for _, name in paired) + " |", "|---" * (len(paired) + 1) + "|"]
    for arm in [a for a in seeds[0]["arms"] if a.startswith("refine")]:
        for basis, other in (("equal steps", "ntp (equal steps)"), ("equal CPU time", f"ntp (equal CPU time of {arm})")):
            if other not in table or len(table[other]) != len(table[f"{arm} (equal steps)"]):
                continue
            cells = [_cell([a[k] - b[k] for a, b in zip(table[f"{arm} (equal steps)"], table[other])], k) for k in keys]
            lines.append(f"| {arm} − ntp, {basis} | " + " | ".join(cells) + " |")
    return "\n".join(lines + curve_lines(seeds)) + "\n"


def curve_lines(seeds: list[dict]) -> list[str]:
    """The whole equal-step curve as paired differences (REFINE arm minus NTP, held-out recall at
    the training length, every evaluation) and each arm's training CPU seconds per step."""
    arms = [a for a in seeds[0]["arms"] if a not in ("start", "ntp")]
    if "ntp" not in seeds[0]["arms"] or not arms:
        return []
    key = columns(seeds[0]["setup"])[0][0]
    steps = [e["step"] for e in seeds[0]["arms"]["ntp"]["evals"] if e["step"] <= seeds[0]["setup"]["continue_steps"]]
    lines = ["", f"Paired differences along the equal-step curve ({key}, REFINE arm minus NTP):", "",
             "| step | " + " | ".join(str(s) for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for arm in arms:
        cells = []
        for i in range(len(steps)):
            diffs = [r["arms"][arm]["evals"][i][key] - r["arms"]["ntp"]["evals"][i][key] for r in seeds]
            cells.append(_cell(diffs, key))
        lines.append(f"| {arm} − ntp | " + " | ".join(cells) + " |")
    per_step = {arm: [r["arms"][arm]["final"]["train_cpu_s"] / r["arms"][arm]["final"]["step"] for r in seeds]
                for arm in [*arms, "ntp"]}
    lines += ["", "Training CPU seconds per step (one thread): " + ", ".join(
        f"{arm} {np.mean(v):.2f} ({np.mean(v) / np.mean(per_step['ntp']):.1f}x ntp)" for arm, v in per_step.items())]
    return lines


def plot(seeds: list[dict], path: Path) -> None:
    """Held-out recall (training length) and fixed-cut greedy exact match against continuation
    steps and against training CPU seconds: mean over seeds, band = ± std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    recall = columns(seeds[0]["setup"])[0][0]
    panels = ((axes[0], "step", recall), (axes[1], "train_cpu_s", recall),
              (axes[2], "step", "val/nsp_exact_greedy"))
    for ax, x_key, y_key in panels:
        for arm in [a for a in seeds[0]["arms"] if a != "start"]:
            # against steps: the equal-step part only; against CPU time: all of it
            runs = [[e for e in r["arms"][arm]["evals"]
                     if x_key != "step" or e["step"] <= r["setup"]["continue_steps"]] for r in seeds]
            n = min(len(evals) for evals in runs)
            x = np.mean([[e[x_key] for e in evals[:n]] for evals in runs], 0)
            y = np.array([[e[y_key] for e in evals[:n]] for evals in runs])
            ax.plot(x, y.mean(0), marker=".", label=arm)
            std = y.std(0, ddof=1) if len(y) > 1 else np.zeros(y.shape[1])
            ax.fill_between(x, y.mean(0) - std, y.mean(0) + std, alpha=0.2)
        ax.set_xlabel("continuation step" if x_key == "step" else "training CPU seconds (one thread)")
        ax.set_title(y_key + " (held out)")
        ax.set_ylabel("recall (answer-token accuracy)" if y_key.endswith("/recall") else "greedy k-token exact (token fraction)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def check_finished(setups: list[Setup], out: Path) -> None:
    """A finished ``seed_<s>.json`` is reused only if the same setup wrote it: raises ValueError
    naming the file and the differing fields otherwise (before any seed starts)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, expected a directory")
    for setup in setups:
        path = out / f"seed_{setup.seed}.json"
        if path.exists():
            try:
                saved = json.loads(path.read_text())["setup"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: not a finished seed's results ({type(e).__name__}: {e}); delete it") from None
            wanted = json.loads(json.dumps(asdict(setup)))
            differ = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
            if differ:
                raise ValueError(f"{path}: written by another setup (field: saved vs requested {differ}); "
                                 f"use another --out or delete it")


def main(setups: list[Setup], out: Path, jobs: int, command: str) -> dict:
    """Run every seed (``jobs`` one-thread processes at a time; a finished seed of the same setup
    is reused), then write the aggregate files."""
    check_finished(setups, out)
    out.mkdir(parents=True, exist_ok=True)
    if jobs > 1 and len(setups) > 1:
        # an executor, not a Pool: a worker that dies (killed for memory) raises here, never hangs
        with ProcessPoolExecutor(min(jobs, len(setups)), mp_context=mp.get_context("spawn")) as pool:
            paths = list(pool.map(run_seed, setups, [out] * len(setups)))
    else:
        paths = [run_seed(s, out) for s in setups]
    seeds = [json.loads(p.read_text()) for p in paths]
    (out / "results.json").write_text(json.dumps({"command": command, "seeds": seeds}))
    (out / "results.md").write_text(markdown(seeds, command))
    plot(seeds, out / "recall.png")
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, recall.png")
    return {"seeds": seeds}


if __name__ == "__main__":
    import shlex
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at once, one thread each")
    parser.add_argument("--continue-steps", type=int, default=Setup.continue_steps)
    parser.add_argument("--arms", nargs="+", default=Setup().arms, choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=Path("outputs/recall"))
    args = parser.parse_args()
    for name, bad, expected in (
            ("--continue-steps", args.continue_steps < 1, ">= 1"), ("--jobs", args.jobs < 1, ">= 1"),
            ("--seeds", not all(0 <= s < 2 ** 32 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds),
             "distinct integers in [0, 2**32)"),
            ("--arms", len(set(args.arms)) != len(args.arms), "distinct")):
        if bad:
            parser.error(f"{name}: {expected} expected")
    setups = [Setup(seed=s, continue_steps=args.continue_steps, arms=args.arms)
              for s in args.seeds]
    try:
        check_finished(setups, args.out)
    except ValueError as e:
        parser.error(str(e))
    main(setups, args.out, args.jobs, shlex.join(["python"] + sys.argv))

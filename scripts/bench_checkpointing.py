#!/usr/bin/env python
"""Activation checkpointing: peak memory and time of one learner step without and with it.

One random model, two copies with the same weights, the second with per-block activation
checkpointing (``models.base.enable_checkpointing``, what ``model.gradient_checkpointing=true``
turns on). For each ``--lengths`` L, every repetition runs the learner's per-document step on
both copies, in alternating order: ``refine.loss.document_loss`` with prefix sharing (one trunk
pass over the document returning the states at the n cuts, the n*G branches from them, NTP +
PPO-clip), then backward; gradients are dropped after each step (the optimizer step is the same
for both and is left out). Cuts, continuations, behaviour log-probs and advantages are random
but fixed per length.

Reported per setting: the median wall time of a step (s) and the median CPU time of this process
during it (s; on shared cores other tenants stretch wall time, not CPU time), each with its spread
(min-max), the median peak-RSS rise of a step above its start (MiB, CPU: ``bench_nsp.Meter``
resets VmHWM after ``malloc_trim``, so the rise is the step's own peak) and the ratios
checkpointed / plain of the medians, measured side by side in one run. CPU only (on CUDA,
``scripts/gpu_check.sh`` measures the REFINE step with and without checkpointing).

Default model: DeltaNet, hidden 256, 8 layers, 4 heads, MLP 704, vocab 4096 (8.6M parameters, 33
MiB in fp32), so the activations of 4K-8K tokens dominate the step's memory.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench_nsp import Meter  # noqa: E402  (scripts/: the CPU peak-RSS probe bench_nsp uses)
from refine_ray.config import RefineConfig  # noqa: E402
from refine_ray.models import registry  # noqa: E402
from refine_ray.models.base import enable_checkpointing  # noqa: E402
from refine_ray.refine.loss import document_loss  # noqa: E402

SETTINGS = ("plain", "checkpointed")


def learner_inputs(L: int, cfg: RefineConfig, vocab: int, seed: int):
    """A document of L random tokens, n cuts spread over it, n*G random continuations of k tokens,
    behaviour log-probs and advantages (what the learner receives for one document)."""
    g = torch.Generator().manual_seed(seed)
    n, G, k = cfg.n_chunks, cfg.samples_per_prefix, cfg.response_length
    ids = torch.randint(0, vocab, (L,), generator=g)
    bounds = torch.linspace(cfg.min_prefix, L - k, n + 1).long()
    cuts = torch.stack([torch.randint(int(lo), int(hi), (1,), generator=g)[0] for lo, hi in zip(bounds, bounds[1:])])
    responses = torch.randint(0, vocab, (n * G, k), generator=g)
    old = -torch.rand(n * G, k, generator=g) * 5
    adv = torch.randn(n * G, generator=g)
    return ids, cuts, responses, old, adv


def step(model, inputs, cfg: RefineConfig, meter: Meter) -> tuple[float, float, float]:
    """One learner fwd+bwd on ``model``: (wall seconds, CPU seconds, peak-RSS rise in MiB or None)."""
    meter.start()
    cpu0 = time.process_time()
    loss, _ = document_loss(model, *inputs, cfg)
    loss.backward()
    cpu = time.process_time() - cpu0
    seconds, _, _, rise = meter.stop()
    model.zero_grad(set_to_none=True)
    return seconds, cpu, rise


def spread(values: list[float], fmt: str) -> str:
    """``median (min-max)``."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--model-type", default="delta_net", choices=registry.MODEL_TYPES)
    add("--hidden", type=int, default=256)
    add("--layers", type=int, default=8)
    add("--heads", type=int, default=4)
    add("--mlp", type=int, default=704, help="intermediate size of the SwiGLU MLP")
    add("--vocab", type=int, default=4096)
    add("--lengths", type=int, nargs="+", default=[4096, 8192])
    add("--reps", type=int, default=5, help="timed repetitions per setting (>= 5 for the docs)")
    add("--n-chunks", type=int, default=8)
    add("--samples", type=int, default=1, help="G, continuations per cut")
    add("--k", type=int, default=5, help="continuation length")
    add("--threads", type=int, default=1, help="CPU threads (1: stable timings on shared cores)")
    add("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meter = Meter(torch.device("cpu"))
    if not meter.rss_ok:
        print("cannot reset the peak RSS here (/proc/self/clear_refs): memory columns are not measured")
    fields = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.heads,
                  intermediate_size=args.mlp, vocab_size=args.vocab)
    plain = registry.build_model(args.model_type, seed=args.seed, **fields).train()
    checkpointed = copy.deepcopy(plain)
    enable_checkpointing(checkpointed)
    models = {"plain": plain, "checkpointed": checkpointed}
    params = sum(p.numel() for p in plain.parameters())
    cfg = RefineConfig(n_chunks=args.n_chunks, samples_per_prefix=args.samples, response_length=args.k,
                       prefix_sharing=True)
    print(f"{args.model_type}: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, MLP {args.mlp}, "
          f"vocab {args.vocab} ({params / 1e6:.1f}M parameters), fp32, {torch.get_num_threads()} thread(s); "
          f"n={cfg.n_chunks} G={cfg.samples_per_prefix} k={cfg.response_length}, prefix sharing; "
          f"{args.reps} reps after 1 warm-up")
    rows = []
    for L in args.lengths:
        inputs = learner_inputs(L, cfg, args.vocab, args.seed + L)
        times: dict[str, list[float]] = {s: [] for s in SETTINGS}
        cpus: dict[str, list[float]] = {s: [] for s in SETTINGS}
        mems: dict[str, list[float]] = {s: [] for s in SETTINGS}
        for name in SETTINGS:                                   # warm-up, untimed
            step(models[name], inputs, cfg, meter)
        for rep in range(args.reps):
            for name in (SETTINGS if rep % 2 == 0 else SETTINGS[::-1]):   # alternate which runs first
                seconds, cpu, rise = step(models[name], inputs, cfg, meter)
                times[name].append(seconds)
                cpus[name].append(cpu)
                if rise is not None:
                    mems[name].append(rise)
            print(f"  L={L} rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{s} {times[s][-1]:.2f} s (CPU {cpus[s][-1]:.2f} s)" + (f" {mems[s][-1]:.0f} MiB" if mems[s] else "")
                for s in SETTINGS), flush=True)
        rows.append((L, times, cpus, mems))
    print("\n| L | plain wall s | ckpt wall s | wall ratio | plain CPU s | ckpt CPU s | CPU ratio | plain peak MiB "
          "| ckpt peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for L, times, cpus, mems in rows:
        ratio = {name: statistics.median(v["checkpointed"]) / statistics.median(v["plain"])
                 for name, v in (("wall", times), ("cpu", cpus))}
        if mems["plain"]:
            m_cols = (spread(mems["plain"], ".0f"), spread(mems["checkpointed"], ".0f"),
                      f"{statistics.median(mems['checkpointed']) / statistics.median(mems['plain']):.2f}")
        else:
            m_cols = ("n/a", "n/a", "n/a")
        print(f"| {L} | {spread(times['plain'], '.2f')} | {spread(times['checkpointed'], '.2f')} | {ratio['wall']:.2f} "
              f"| {spread(cpus['plain'], '.2f')} | {spread(cpus['checkpointed'], '.2f')} | {ratio['cpu']:.2f} | "
              + " | ".join(m_cols) + " |")
    print("\nmedian (min-max) over the reps; CPU = this process's CPU time during the step; "
          "peak = peak-RSS rise of one step above its start")
    return 0


if __name__ == "__main__":
    sys.exit(main())

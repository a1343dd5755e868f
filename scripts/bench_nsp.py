#!/usr/bin/env python
"""One REFINE step per document, three ways, timed side by side (issue: one pass per document).

Variants (one document of L tokens, n cuts, G samples per cut, k tokens per sample):
  a    NTP only: forward_segment over the document + document_ntp_loss + backward + AdamW step.
  b    REFINE, re-encode (the reference): score_document (no grad) + prefill of every prefix + k-token
       sampling (sample_at_cuts) + old log-probs (document_logprobs(shared=False), no grad) + learner fwd+bwd
       via document_loss (prefix_sharing off), accumulating per micro-batch (NTP, then one per cut, as the
       reference; ``--reencode-learner whole``: one call, as the learner).
  c    REFINE, prefix sharing: score_document(with_states=True) + sample_at_cuts from the cut states
       (one decode batch of all cuts for offset-free states, as the rollout role) + behaviour log-probs
       from sampling + document_loss (prefix_sharing on: shared trunk, branches batched the same way) + step.
  Both reward with the policy-cosine SequenceRewarder and GRPO advantages, as the pipeline does.
Variants run interleaved in every repetition (rotating order); we report medians over reps after
warm-up (total, per stage, per token) and peak memory: CUDA max_memory_allocated (absolute / above
the step's start) or, on CPU, the peak-RSS rise of one extra untimed rep (VmHWM reset via
/proc/self/clear_refs after malloc_trim; 'n/a' where unavailable).
Target: (c)/(a) <= 1.5 at n=8, G=1; time per token roughly flat in L (linear scaling).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from refine_ray.algo import grpo_advantages, make_group_ids  # noqa: E402
from refine_ray.config import RefineConfig  # noqa: E402
from refine_ray.models.generation import prefill  # noqa: E402
from refine_ray.models.registry import FAST_WEIGHT_TYPES  # noqa: E402
from refine_ray.refine.loss import document_loss  # noqa: E402
from refine_ray.refine.rewarding import SequenceRewarder  # noqa: E402
from refine_ray.refine.sampling import continuation_seeds, sample_at_cuts  # noqa: E402
from refine_ray.refine.scoring import resolve_state_stride, score_document  # noqa: E402
from refine_ray.refine.sequence_logprobs import document_logprobs, document_ntp_loss  # noqa: E402

SIZES = {  # named sizes: explicit config fields over the registry's tiny preset
    "tiny": {},
    "small": dict(hidden_size=256, num_hidden_layers=4, num_heads=4, intermediate_size=704, vocab_size=4096),
    "deltanet-340m": dict(hidden_size=1024, num_hidden_layers=24, num_heads=8, intermediate_size=2816,
                          vocab_size=32000),
    "deltanet-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_heads=16, intermediate_size=5632,
                          vocab_size=32000),
}
VARIANTS = ("a", "b", "c")
TARGET = 1.5


class Meter:
    """Stage stopwatch (synchronising on CUDA) plus a peak-memory probe."""

    def __init__(self, device: torch.device, cpu_mem: bool = True):
        self.cuda = device.type == "cuda"
        self.rss_ok = not self.cuda and cpu_mem and _reset_hwm()

    def sync(self):
        torch.cuda.synchronize() if self.cuda else None

    def start(self, probe_mem: bool = True):
        self.sync()
        self.stages, self.probe = {}, probe_mem
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.rss_ok and probe_mem:
            _reset_hwm()
            self.base = _proc_kb("VmRSS")
        self.t0 = self.last = time.perf_counter()

    def lap(self, name: str):
        self.sync()
        now, self.stages[name] = time.perf_counter(), self.stages.get(name, 0.0)
        self.stages[name] += now - self.last
        self.last = now

    def stop(self) -> tuple[float, dict, float | None, float | None]:
        self.sync()
        total = time.perf_counter() - self.t0
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            return total, self.stages, peak / 2**20, (peak - self.base) / 2**20
        rise = (_proc_kb("VmHWM") - self.base) / 1024 if (self.rss_ok and self.probe) else None
        return total, self.stages, None, rise


def _proc_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def _reset_hwm() -> bool:
    """Return freed heap to the OS (so RSS = live memory), then reset the peak RSS (VmHWM)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            return f.write("5") > 0
    except (OSError, AttributeError):
        return False


class Bench:
    """The three variants on one model and optimizer; the REFINE variants use the pipeline's own
    sampler (sample_at_cuts), reward (SequenceRewarder) and loss (document_loss)."""

    def __init__(self, args, model, device):
        self.a, self.model, self.device = args, model, device
        self.cfg = RefineConfig(n_chunks=args.n_chunks, response_length=args.k, samples_per_prefix=args.samples)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        self.gen = torch.Generator(device=device).manual_seed(args.seed)
        self.rewarder = SequenceRewarder("cosine", "policy")
        self.calls = 0                    # keys the sample seeds (with --seed), one per REFINE step

    def _step(self, m: Meter):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        m.lap("optim")

    def _advantages(self, score, conts):
        G = self.cfg.samples_per_prefix
        rewards = self.rewarder(conts.tokens, score.gt_ids, conts.hidden, score.gt_hidden).rewards
        return grpo_advantages(rewards, make_group_ids(1, score.cuts.numel(), G)).to(self.device)

    def _sample(self, states, cut_hidden, m: Meter):
        r = self.cfg
        self.calls += 1
        seeds = continuation_seeds(self.a.seed, self.calls, 0, len(states), r.samples_per_prefix)
        out = sample_at_cuts(self.model, states, cut_hidden, r.response_length, r.samples_per_prefix,
                             r.temperature, r.top_p, seeds)
        m.lap("rollout")
        return out

    def step_a(self, ids, m: Meter):
        document_ntp_loss(self.model, ids).backward()
        m.lap("learn")
        self._step(m)

    def step_b(self, ids, m: Meter):
        r, G = replace(self.cfg, prefix_sharing=False), self.cfg.samples_per_prefix
        score = score_document(self.model, ids, r, self.gen, with_states=False)
        m.lap("score")
        cuts = score.cuts.tolist()
        prefixes = [prefill(self.model, [ids[:c]]) for c in cuts]  # one row at a time, as FastWeightRollout
        m.lap("prefill")
        conts = self._sample([p[0] for p in prefixes], torch.cat([p[1] for p in prefixes]), m)
        with torch.no_grad():
            old = document_logprobs(self.model, ids, score.cuts, conts.tokens, G, r.temperature, shared=False,
                                    with_ntp=False).logprobs
        m.lap("old_logprob")
        adv = self._advantages(score, conts)
        if self.a.reencode_learner == "whole":
            document_loss(self.model, ids, score.cuts, conts.tokens, old, adv, r)[0].backward()
        else:  # reference: NTP micro-batch, then PPO micro-batches, gradients accumulated
            (r.ntp_coef * document_ntp_loss(self.model, ids)).backward()
            pg_only = replace(r, ntp_coef=0.0)
            for j in range(len(cuts)):
                rows = slice(j * G, (j + 1) * G)
                loss = document_loss(self.model, ids, score.cuts[j:j + 1], conts.tokens[rows], old[rows], adv[rows],
                                     pg_only)[0]
                (loss / len(cuts)).backward()  # / n: the sum over micro-batches == token-mean over n·G·k tokens
        m.lap("learn")
        self._step(m)

    def step_c(self, ids, m: Meter):
        r = replace(self.cfg, prefix_sharing=True)
        score = score_document(self.model, ids, r, self.gen, with_states=True, state_stride=self.a.state_stride,
                               states_device=None)
        m.lap("score")
        conts = self._sample(score.cut_states, score.cut_hidden, m)
        adv = self._advantages(score, conts)
        document_loss(self.model, ids, score.cuts, conts.tokens, conts.logprobs, adv, r)[0].backward()
        m.lap("learn")
        self._step(m)

    def run(self, variant: str, ids, m: Meter, probe_mem: bool = True):
        self.model.train()
        m.start(probe_mem)
        try:
            {"a": self.step_a, "b": self.step_b, "c": self.step_c}[variant](ids, m)
        except torch.cuda.OutOfMemoryError:
            self.opt.zero_grad(set_to_none=True), torch.cuda.empty_cache()
            return None
        return m.stop()


def build(args, device):
    from refine_ray.models.registry import build_model, family
    fields = dict(SIZES[args.size])
    if args.vocab:
        fields["vocab_size"] = args.vocab
    if args.size != "tiny" and not family(args.model_type).bench_sizes:
        raise SystemExit(f"named sizes are DeltaNet-family configs; use --size tiny for {args.model_type}")
    return build_model(args.model_type, seed=args.seed, **fields).to(device=device, dtype=getattr(torch, args.dtype))


def fmt(x, spec=".3f"):
    return "n/a" if x is None else ("OOM" if x == "OOM" else format(x, spec))


def table(args, results, variants, device) -> list[str]:
    mem_kind = "CUDA peak MiB (abs / above start)" if device.type == "cuda" else "peak RSS rise MiB"
    head = ["L"] + [f"{v} s" for v in variants] + [f"{v}/a" for v in variants if v != "a"]
    head += [f"{v} µs/tok" for v in variants] + [f"{v} mem" for v in variants]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for L in args.lengths:
        res = results[L]
        med = {v: (statistics.median(res[v]["t"]) if res[v]["t"] else "OOM") for v in variants}
        row = [str(L)] + [fmt(med[v]) for v in variants]
        row += [fmt(med[v] / med["a"], ".2f") if isinstance(med[v], float) and isinstance(med["a"], float)
                else "n/a" for v in variants if v != "a"]
        row += [fmt(med[v] / L * 1e6, ".1f") if isinstance(med[v], float) else "OOM" for v in variants]
        row += [f"{res[v]['peak']:.0f} / {res[v]['delta']:.0f}" if res[v]["peak"] is not None
                else fmt(res[v]["delta"], ".0f") for v in variants]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"\nmemory column: {mem_kind}. Target: c/a <= {TARGET} (n={args.n_chunks}, G={args.samples}).")
    return lines


def stage_table(args, results, variants) -> list[str]:
    names = ("score", "prefill", "rollout", "old_logprob", "learn", "optim")
    lines = ["| L | variant | " + " | ".join(names) + " |", "|" + "---|" * 8]
    return lines + [f"| {L} | {v} | " + " | ".join(fmt(statistics.median(st[s]) if st.get(s) else None) for s in names)
                    + " |" for L in args.lengths for v in variants for st in [results[L][v]["stages"]]]


def profile(bench, variant, ids, m, sort):
    from torch.profiler import ProfilerActivity, profile as tprofile
    bench.run(variant, ids, m)  # warm-up
    with tprofile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if m.cuda else [])) as prof:
        bench.run(variant, ids, m)
    print(prof.key_averages().table(sort_by=sort, row_limit=30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--model-type", default="delta_net", choices=FAST_WEIGHT_TYPES)
    add("--size", default="tiny", choices=sorted(SIZES))
    add("--vocab", type=int, default=0, help="override the size's vocab (tiny preset: 256)")
    add("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    for flag, default in (("--n-chunks", 8), ("--samples", 1), ("--k", 5), ("--reps", 3), ("--warmup", 1),
                          ("--seed", 0)):
        add(flag, type=int, default=default)  # --samples is G
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--variants", nargs="+", default=None, help=f"subset of {VARIANTS} (a is always run)")
    add("--state-stride", type=int, default=0,
        help="score_document's state_stride for c (refine.state_stride; 0: the model's default)")
    add("--reencode-learner", default="microbatch", choices=["microbatch", "whole"])
    add("--threads", type=int, default=1, help="CPU threads (default 1: on shared cores 2 gave 10-100x outliers)")
    add("--no-cpu-mem", action="store_true", help="skip the extra untimed CPU peak-RSS rep")
    add("--markdown", default=None, help="also write the tables to this markdown file")
    add("--profile", default=None, choices=VARIANTS, help="profile one variant at the first length")
    add("--profile-sort", default="self_cpu_time_total")
    args = ap.parse_args()

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = build(args, device)
    m = Meter(device, cpu_mem=not args.no_cpu_mem)
    bench = Bench(args, model, device)
    variants = ["a"] + [v for v in (args.variants or VARIANTS) if v != "a"]
    nparams = sum(p.numel() for p in model.parameters())
    from refine_ray.models.ops import kernel_backend
    desc = (f"model {args.model_type}/{args.size} ({nparams / 1e6:.1f}M params, {args.dtype}) on {device}"
            f" [{torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}]"
            f", kernels {kernel_backend(torch.zeros(1, device=device))}, "
            f"n={args.n_chunks} G={args.samples} k={args.k}, "
            f"reps {args.reps} (+{args.warmup} warm-up), state_stride {resolve_state_stride(model, args.state_stride)}, "
            f"re-encode learner {args.reencode_learner}, torch {torch.__version__}")
    print(desc, flush=True)

    def mk_ids(L):
        return torch.randint(0, model.config.vocab_size, (L,), generator=torch.Generator().manual_seed(L)).to(device)
    if args.profile:
        profile(bench, args.profile, mk_ids(args.lengths[0]), m, args.profile_sort)
        return 0

    results = {}
    for L in args.lengths:
        ids = mk_ids(L)
        res = {v: {"t": [], "stages": defaultdict(list), "peak": None, "delta": None, "oom": False}
               for v in variants}
        cpu_mem_rep = int(m.rss_ok)  # CPU: peak RSS from one extra, untimed rep (the probe costs time)
        for rep in range(args.warmup + args.reps + cpu_mem_rep):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            timed = args.warmup <= rep < args.warmup + args.reps
            for v in order:
                if res[v]["oom"]:
                    continue
                out = bench.run(v, ids, m, probe_mem=m.cuda or not timed)
                if out is None:
                    res[v].update(oom=True, t=[], peak=None, delta="OOM")
                    continue
                total, stages, peak, delta = out
                if timed:
                    res[v]["t"].append(total)
                    for s, x in stages.items():
                        res[v]["stages"][s].append(x)
                if rep >= args.warmup:
                    if peak is not None:
                        res[v]["peak"] = max(peak, res[v]["peak"] or 0.0)
                    if delta is not None:
                        res[v]["delta"] = max(delta, res[v]["delta"] or 0.0)
        results[L] = res
        meds = {v: (statistics.median(res[v]["t"]) if res[v]["t"] else float("nan")) for v in variants}
        print(f"L={L}: " + "  ".join(f"{v}={meds[v]:.3f}s" for v in variants), flush=True)

    med = {(L, v): statistics.median(results[L][v]["t"]) for L in args.lengths for v in variants
           if results[L][v]["t"]}
    L0, L1 = args.lengths[0], args.lengths[-1]
    scaling = [f"- {v}: time/token at L={L1} vs L={L0}: {med[L1, v] / L1 / (med[L0, v] / L0):.2f}x (1.00 = linear)"
               for v in variants if (L0, v) in med and (L1, v) in med]
    verdict = [f"- {v}/a at L={L1}: {med[L1, v] / med[L1, 'a']:.2f} -> "
               f"{'MEETS' if med[L1, v] / med[L1, 'a'] <= TARGET else 'MISSES'} the target <= {TARGET}"
               for v in ("c",) if (L1, v) in med and (L1, "a") in med]
    text = "\n".join([desc, "", *table(args, results, variants, device), "", "Per-stage medians (s):", "",
                      *stage_table(args, results, variants), "", "Scaling:", *scaling, "", "Target:", *verdict])
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"`{' '.join(sys.argv)}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

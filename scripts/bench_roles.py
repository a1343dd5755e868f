"""Where a RefineController step goes: time per role, learner, weight publication, data movement.

Starts a local Ray cluster (logical GPUs, as the tests), runs ``--warmup`` + ``--steps``
steps of :class:`refine_ray.system.controller.RefineController` and splits each step into

* role compute: the ``task:execute`` span of every role call in the step's window, read
  from Ray's own task profile (``ray.timeline()``): scorer, rollout, reward, reference,
  learner (``train_step``, slowest rank), weight gather (``send_weights`` on the learner ranks), and weight
  load in the receivers (``receive_weights``);
* data movement measured inside the step: the ``task:deserialize_arguments`` (fetch +
  unpickle of argument objects) and ``task:store_outputs`` (return values into the object
  store) spans of the same calls;
* the driver's phase timers from the step metrics (``time/wait_experience_s``,
  ``time/learn_s``, ``time/publish_s``, ``time/weight_gather_s``); what a phase's timer
  holds beyond the compute and the measured (de)serialisation of its calls is
  scheduling / driver-side transfer (``ray.put``/``ray.get`` on the driver) overhead.

It also measures the raw object-store cost of the step's payloads directly: ``ray.put``,
driver ``ray.get`` and an actor fetching the object (minus an empty call) for a
LearnBatch, the scorer/rollout batches and the published weights dict, with sizes in MB.

    .venv/bin/python scripts/bench_roles.py --steps 3 system.mode=async refine.prefix_sharing=true
    .venv/bin/python scripts/bench_roles.py --steps 3 --compare-modes      # sync, then async
    .venv/bin/python scripts/bench_roles.py --throughput --rounds 5 --steps 2 system.placement=disaggregated

``--throughput`` measures async against sync side by side instead: two controllers on one cluster
(``name`` and output directory of their own), ``--rounds`` rounds in each of which each mode runs a
block of ``--steps`` steps, the two blocks in alternating order (sync first in even rounds), after
``--warmup`` steps of each. A block is timed from its first step's start until its last step is done
and, in async mode, the generation that step launched has finished too (the next block starts from
it, so every block pays for its own generations and nothing runs beside the other mode's block).
Throughput = documents (and tokens) of the block's steps / its seconds; reported per round, as
medians with their spread (min-max), and as the ratio async/sync of the medians and per round.

In async mode the experience of step t+1 is generated while the learner trains on step t,
so role compute overlaps the learner and the per-role percentages may add up to more
than 100%; ``wait_experience`` is then only the part of generation the learner did not hide.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from refine_ray.transport.batches import LearnBatch  # noqa: E402
from refine_ray.config import load_config  # noqa: E402
from refine_ray.data import load_tokenizer  # noqa: E402

ROLE_CALLS = {"scorer": "ScorerRole.score_rows", "rollout": "RolloutRole.generate", "reward": "RewardRole.score",
              "reference": "ReferenceRole.logprobs", "learner": "LearnerRankRole.train_step",
              "gather": "LearnerRankRole.send_weights", "load_w": "receive_weights"}


# ------------------------------------------------------------------ Ray task profile
def task_spans(events: list) -> list[dict]:
    """One record per task: call name, worker, start/end (s), execute / deserialize / store seconds."""
    by_tid = defaultdict(list)
    for e in events:
        if e.get("ph") == "X":
            by_tid[e["tid"]].append(e)
    out = []
    for tid, evs in by_tid.items():
        subs = [e for e in evs if e["cat"].startswith("task:") and not e["cat"].startswith("task::")]
        for t in (e for e in evs if e["cat"].startswith("task::")):
            t0, t1 = t["ts"], t["ts"] + t["dur"]
            rec = {"call": t["cat"][len("task::"):], "tid": tid, "start": t0 / 1e6, "end": t1 / 1e6,
                   "execute": 0.0, "deserialize_arguments": 0.0, "store_outputs": 0.0}
            for s in subs:
                if t0 <= s["ts"] <= t1:
                    key = s["cat"][len("task:"):]
                    if key in rec:
                        rec[key] += s["dur"] / 1e6
            out.append(rec)
    return out


def split_window(spans: list[dict], t0: float, t1: float) -> dict[str, float]:
    """Per-role compute and object-store time of the tasks that started in [t0, t1)."""
    busy = defaultdict(lambda: defaultdict(float))     # role -> worker -> execute seconds
    io = defaultdict(float)                             # role -> deserialize + store seconds
    for s in spans:
        if not t0 <= s["start"] < t1:
            continue
        for role, call in ROLE_CALLS.items():
            if s["call"].endswith(call):
                busy[role][s["tid"]] += s["execute"]
                io[role] += s["deserialize_arguments"] + s["store_outputs"]
    out = {f"exec/{r}": max(busy[r].values()) if busy[r] else 0.0 for r in ROLE_CALLS}   # busiest actor
    out.update({f"io/{r}": io[r] for r in ROLE_CALLS})
    return out


# ------------------------------------------------------------------ raw object-store cost
@ray.remote(num_cpus=0)
class Probe:
    def fetch(self, obj) -> int:          # the argument is fetched from the store and deserialised
        return 0

    def empty(self) -> int:
        return 0


def nbytes(obj) -> int:
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if hasattr(obj, "__dataclass_fields__"):
        return sum(nbytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


def object_store_cost(payloads: dict, reps: int) -> list[dict]:
    probe = Probe.remote()
    ray.get(probe.empty.remote())
    empty = statistics.median(_timed(lambda: ray.get(probe.empty.remote())) for _ in range(reps))
    rows = []
    for name, obj in payloads.items():
        put, get, fetch = [], [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            ref = ray.put(obj)
            put.append(time.perf_counter() - t0)
            get.append(_timed(lambda: ray.get(ref)))
            fetch.append(max(_timed(lambda: ray.get(probe.fetch.remote(ref))) - empty, 0.0))
            del ref
        rows.append({"payload": name, "MB": nbytes(obj) / 2**20, "put": statistics.median(put),
                     "get": statistics.median(get), "fetch": statistics.median(fetch)})
    ray.kill(probe)
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ one controller
def run_mode(config: str, overrides: list[str], warmup: int, steps: int, reps: int) -> dict:
    from refine_ray.system.controller import RefineController

    out_dir = tempfile.mkdtemp(prefix="bench_roles_")
    cfg = load_config(config, [*overrides, f"train.output_dir={out_dir}", "train.resume=false"])
    print(f"\n=== {cfg.name}: mode={cfg.system.mode} prefix_sharing={cfg.refine.prefix_sharing} "
          f"reference={cfg.reference.enabled} learner ranks={cfg.learner.num_ranks} "
          f"batch={cfg.data.batch_size} n={cfg.refine.n_chunks} G={cfg.refine.samples_per_prefix} "
          f"k={cfg.refine.response_length} max_length={cfg.data.max_length}", flush=True)
    t0 = time.perf_counter()
    controller = RefineController(cfg, len(load_tokenizer(cfg.tokenizer.path)))
    print(f"controller up in {time.perf_counter() - t0:.1f}s", flush=True)
    try:
        windows = []
        for i in range(warmup + steps):
            w0 = time.time()
            m = controller.step()
            windows.append((w0, time.time(), m))
            print(f"  step {i}{' (warm-up)' if i < warmup else ''}: {m['time/step_s']:.2f}s", flush=True)
        exp = controller.last_experience
        learn = LearnBatch(docs=exp.scored.docs, cuts=exp.scored.cuts, responses=exp.rollout.tokens,
                           old_logprobs=exp.rollout.logprobs, advantages=np.zeros(len(exp.rollout.tokens), np.float32),
                           samples_per_prefix=exp.rollout.samples_per_prefix,
                           ref_logprobs=exp.ref_logprobs)
        payloads = {"LearnBatch": learn, "ScoredBatch": exp.scored, "RolloutBatch": exp.rollout,
                    "weights": controller.learners.call_all("full_weights")[0]}
        store = object_store_cost(payloads, reps)
        time.sleep(2.5)                 # task profile events reach the GCS once a second
        spans = task_spans(ray.timeline())
    finally:
        controller.shutdown()
    rows = [decompose(m, split_window(spans, w0, w1), cfg) for w0, w1, m in windows[warmup:]]
    n_recv = cfg.scorer.num_actors + cfg.rollout.num_actors
    consumers = {"LearnBatch": cfg.learner.num_ranks, "ScoredBatch": 3 + cfg.reference.enabled,
                 "RolloutBatch": 2 + cfg.reference.enabled, "weights": n_recv}
    for r in store:       # what moving this payload costs per step: one put + one fetch per consumer
        r["per_step"] = r["put"] + consumers[r["payload"]] * r["fetch"]
        if r["payload"] == "weights":
            r["per_step"] += r["get"]          # object-store weight sync: rank 0's dict -> every receiver
    return {"cfg": cfg, "rows": rows, "store": store}


def decompose(m: dict, tl: dict, cfg) -> dict:
    """Seconds per component of one step (see the module docstring)."""
    d = {"step": m["time/step_s"], "wait": m["time/wait_experience_s"], "learn": m["time/learn_s"],
         "publish": m["time/publish_s"], "gather": m["time/weight_gather_s"]}
    for r in ("scorer", "rollout", "reward", "reference", "learner", "gather", "load_w"):
        d[f"c_{r}"] = tl[f"exec/{r}"]
    d["timer_scorer"], d["timer_rollout"] = m["time/scorer_compute_s"], m["time/rollout_compute_s"]
    d["timer_reward"] = m["time/reward_compute_s"]
    d["acks"] = d["publish"] - d["gather"]
    d["driver_other"] = d["step"] - d["wait"] - d["learn"] - d["publish"]
    d["io_exp"] = sum(tl[f"io/{r}"] for r in ("scorer", "rollout", "reward", "reference"))
    d["io_learn"] = tl["io/learner"]
    d["io_weights"] = tl["io/gather"] + tl["io/load_w"]
    critical = d["c_scorer"] + d["c_rollout"] + max(d["c_reward"], d["c_reference"])
    if cfg.system.mode == "sync":          # the chain runs inside wait_experience
        d["exp_overhead"] = d["wait"] - critical - d["io_exp"]
    else:                                  # overlapped with the learner: only the exposed wait is on the clock
        d["exp_overhead"] = float("nan")
    d["learn_overhead"] = d["learn"] - d["c_learner"] - d["io_learn"]
    d["pub_overhead"] = d["publish"] - d["c_gather"] - (d["c_load_w"] if cfg.system.mode == "sync" else 0.0) \
        - d["io_weights"]
    # moving data + syncing weights: measured (de)serialisation on the step's path, the publication,
    # and the unexplained rest of the experience / learn phases (driver put/get, scheduling)
    d["moving_data"] = (d["io_exp"] if cfg.system.mode == "sync" else 0.0) + d["io_learn"] \
        + max(d["learn_overhead"], 0.0) + (max(d["exp_overhead"], 0.0) if cfg.system.mode == "sync" else 0.0)
    d["move_and_sync"] = d["moving_data"] + d["publish"]
    return d


# ------------------------------------------------------------------ async vs sync throughput
def drain(controller) -> None:
    """Wait (without collecting) for the experience an async step launched: its role calls queue behind
    the weight updates on the same actors, so those are done too. Nothing for a sync controller."""
    pending = controller.pending
    if pending is not None and pending.shards:
        refs = [r for sh in pending.shards for r in (sh.scored, sh.rollout, sh.rewards, sh.ref_logprobs)
                if r is not None]
        ray.wait(refs, num_returns=len(refs))


def run_block(controller, steps: int) -> tuple[float, int, int]:
    """(seconds, documents, tokens) of ``steps`` steps, ending once any launched generation is done."""
    docs = tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        controller.step()
        exp = controller.last_experience
        docs += len(exp.scored.docs)
        tokens += len(exp.scored.docs.tokens)
    drain(controller)
    return time.perf_counter() - t0, docs, tokens


def throughput(config: str, overrides: list[str], warmup: int, steps: int, rounds: int) -> None:
    """Sync and async controllers side by side, blocks interleaved (see the module docstring)."""
    from refine_ray.system.controller import RefineController

    base = [o for o in overrides if not o.startswith(("system.mode=", "name=", "train.output_dir="))]
    controllers = {}
    for mode in ("sync", "async"):
        cfg = load_config(config, [*base, f"system.mode={mode}", f"name=bench-{mode}", "train.resume=false",
                                   f"train.output_dir={tempfile.mkdtemp(prefix=f'bench_roles_{mode}_')}"])
        t0 = time.perf_counter()
        controllers[mode] = RefineController(cfg, len(load_tokenizer(cfg.tokenizer.path)))
        print(f"{mode} controller up in {time.perf_counter() - t0:.1f}s ({cfg.system.placement}, "
              f"{cfg.learner.num_ranks} learner ranks, batch {cfg.data.batch_size} x {cfg.data.max_length} tokens, "
              f"n={cfg.refine.n_chunks} G={cfg.refine.samples_per_prefix} k={cfg.refine.response_length})", flush=True)
    try:
        for mode, c in controllers.items():
            run_block(c, warmup)
        rows = []
        for r in range(rounds):
            order = ("sync", "async") if r % 2 == 0 else ("async", "sync")
            row = {}
            for mode in order:
                seconds, docs, tokens = run_block(controllers[mode], steps)
                row[mode] = {"s": seconds, "docs_per_s": docs / seconds, "tokens_per_s": tokens / seconds}
            row["ratio"] = row["async"]["docs_per_s"] / row["sync"]["docs_per_s"]
            rows.append(row)
            print(f"  round {r + 1}/{rounds} ({' then '.join(order)}): sync {row['sync']['s']:.2f}s "
                  f"{row['sync']['docs_per_s']:.3f} docs/s, async {row['async']['s']:.2f}s "
                  f"{row['async']['docs_per_s']:.3f} docs/s, async/sync {row['ratio']:.2f}", flush=True)
    finally:
        for c in controllers.values():
            c.shutdown()

    def spread(values: list[float], f: str = ".3f") -> str:
        return f"{statistics.median(values):{f}} ({min(values):{f}}-{max(values):{f}})"

    print(f"\n{rounds} rounds of {steps} steps per mode, median (min-max)\n")
    print("| mode | block s | documents/s | tokens/s |")
    print("|---|---|---|---|")
    for mode in ("sync", "async"):
        print(f"| {mode} | {spread([r[mode]['s'] for r in rows], '.2f')} | "
              f"{spread([r[mode]['docs_per_s'] for r in rows])} | "
              f"{spread([r[mode]['tokens_per_s'] for r in rows], '.0f')} |")
    ratio = statistics.median(r["async"]["docs_per_s"] for r in rows) / \
        statistics.median(r["sync"]["docs_per_s"] for r in rows)
    print(f"\nthroughput async/sync: {ratio:.2f} (ratio of the medians); "
          f"per round {spread([r['ratio'] for r in rows], '.2f')}")


# ------------------------------------------------------------------ printing
TABLE = [  # key, label, how it is measured
    ("c_scorer", "scorer compute", "timeline execute (busiest actor)"),
    ("c_rollout", "rollout compute", "timeline execute"),
    ("c_reward", "reward compute", "timeline execute"),
    ("c_reference", "reference compute", "timeline execute"),
    ("io_exp", "experience args/outputs (de)serialise", "timeline deserialize_arguments + store_outputs"),
    ("exp_overhead", "experience scheduling + driver fetch/merge", "wait_experience - chain compute - io (sync)"),
    ("wait", "= wait for experience", "driver time/wait_experience_s"),
    ("c_learner", "learner compute (train_step)", "timeline execute, slowest rank"),
    ("io_learn", "learner LearnBatch fetch", "timeline deserialize_arguments, all ranks"),
    ("learn_overhead", "learner put + dispatch + result", "learn_s - compute - fetch"),
    ("learn", "= learner phase", "driver time/learn_s"),
    ("c_gather", "weight gather (state_dict)", "timeline execute, rank 0"),
    ("gather", "weight gather, until rank 0 holds it", "driver time/weight_gather_s"),
    ("c_load_w", "weight load in receivers", "timeline execute receive_weights, busiest"),
    ("io_weights", "weights (de)serialise in actors", "timeline, gather store + receivers fetch"),
    ("acks", "wait for acks", "publish_s - weight_gather_s (sync only)"),
    ("publish", "= weight publication", "driver time/publish_s"),
    ("driver_other", "driver: advantages + LearnBatch build", "step - wait - learn - publish"),
    ("step", "step", "driver time/step_s"),
    ("moving_data", "moving data (measured + unexplained)", "io on the path + exp/learn overheads"),
    ("move_and_sync", "moving data + syncing weights", "moving_data + publish"),
]


def med(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if not np.isnan(r[key])]
    return statistics.median(vals) if vals else float("nan")


def fmt(x: float, pct: float = None) -> str:
    if np.isnan(x):
        return "–"
    return f"{x:.3f}" if pct is None else f"{x:.3f} ({100 * x / pct:.0f}%)"


def print_steps(res: dict) -> None:
    print(f"\nper step ({res['cfg'].system.mode}), seconds (% of step):")
    for i, r in enumerate(res["rows"]):
        s = r["step"]
        print(f"  step {i}: step {s:.2f} | scorer {fmt(r['c_scorer'], s)} rollout {fmt(r['c_rollout'], s)} "
              f"reward {fmt(r['c_reward'], s)} ref {fmt(r['c_reference'], s)} | wait {fmt(r['wait'], s)} | "
              f"learn {fmt(r['learn'], s)} (compute {fmt(r['c_learner'], s)}) | publish {fmt(r['publish'], s)} "
              f"(gather {fmt(r['gather'], s)}) | moving data {fmt(r['moving_data'], s)} | "
              f"data+sync {fmt(r['move_and_sync'], s)}")


def print_table(results: list[dict]) -> None:
    modes = [r["cfg"].system.mode for r in results]
    steps = [med(r["rows"], "step") for r in results]
    print(f"\nmedian over {len(results[0]['rows'])} steps, seconds (% of the step)\n")
    print("| component | " + " | ".join(modes) + " | how measured |")
    print("|---" * (len(modes) + 2) + "|")
    for key, label, how in TABLE:
        if key == "c_reference" and not results[0]["cfg"].reference.enabled:
            continue
        cells = [fmt(med(r["rows"], key), s) for r, s in zip(results, steps)]
        bold = label.startswith("=") or key in ("step", "move_and_sync")
        label = f"**{label}**" if bold else label
        print(f"| {label} | " + " | ".join(cells) + f" | {how} |")
    t = results[0]["rows"]
    print(f"\nrole timers (compute_s in the batches, {modes[0]}): scorer {med(t, 'timer_scorer'):.3f}  "
          f"rollout {med(t, 'timer_rollout'):.3f}  reward {med(t, 'timer_reward'):.3f}")
    print("\nraw object-store cost (median of reps; fetch = actor call taking the ref minus an empty call)\n")
    print("| payload | MB | put s | driver get s | actor fetch s | per step s (put + fetch x consumers) |")
    print("|---|---|---|---|---|---|")
    for r in results[0]["store"]:
        print(f"| {r['payload']} | {r['MB']:.3f} | {r['put']:.4f} | {r['get']:.4f} | {r['fetch']:.4f} | "
              f"{r['per_step']:.4f} |")
    for res, s in zip(results, steps):
        raw = sum(r["per_step"] for r in res["store"])
        print(f"{res['cfg'].system.mode}: raw object-store cost of one step's payloads {raw:.3f}s "
              f"= {100 * raw / s:.1f}% of the median step {s:.2f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. system.mode=async")
    ap.add_argument("--config", default="configs/tiny_deltanet_mid.yaml")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each object-store measurement")
    ap.add_argument("--compare-modes", action="store_true", help="run sync, then async (same overrides)")
    ap.add_argument("--throughput", action="store_true",
                    help="async vs sync throughput: both controllers up, blocks of --steps interleaved for --rounds")
    ap.add_argument("--rounds", type=int, default=5, help="--throughput: rounds (one block of each mode per round)")
    args = ap.parse_args()
    # two controllers side by side need room for both layouts (logical GPUs, as the tests)
    ray.init(num_cpus=16 if args.throughput else 8, num_gpus=4 if args.throughput else 2, include_dashboard=False,
             log_to_driver=False)
    try:
        if args.throughput:
            print(f"command: .venv/bin/python scripts/bench_roles.py {' '.join(sys.argv[1:])}", flush=True)
            throughput(args.config, args.overrides, args.warmup, args.steps, args.rounds)
            return
        if args.compare_modes:
            base = [o for o in args.overrides if not o.startswith("system.mode=")]
            results = [run_mode(args.config, [*base, f"system.mode={m}"], args.warmup, args.steps, args.reps)
                       for m in ("sync", "async")]
        else:
            results = [run_mode(args.config, args.overrides, args.warmup, args.steps, args.reps)]
        for res in results:
            print_steps(res)
        print_table(results)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

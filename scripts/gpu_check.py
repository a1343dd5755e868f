#!/usr/bin/env python
"""The python part of the prepared GPU acceptance run (``bash scripts/gpu_check.sh``, issue 23 point 6).

Parts, in this order, each in its own process with its own time budget (seconds; time a part
leaves unused passes to the next, all within ``--budget-s``), so a slow Triton autotune or a hang
in one part is recorded as timed out and the others still run:

  parity_delta_net       scripts/gpu_model_parity.py --only delta_net: fla's Triton kernels vs our
                         PyTorch references, fp32 and bf16, prefix-shared (kept) states included
  refine_step            the single-process REFINE step (refine.local_step.LocalRefineStep, whose
                         loss is the learner's document_loss) on a random DeltaNet-340M (bench_nsp's
                         "deltanet-340m" size) at 16K tokens in bf16 with the paper's REFINE settings
                         (configs/base/paper.yaml), activation checkpointing off then on: NTP-only
                         and REFINE steps interleaved; step times, REFINE/NTP ratio and peak GPU
                         memory (torch.cuda.max_memory_allocated)
  parity_gated_deltanet  as parity_delta_net
  parity_lact            as parity_delta_net (LaCT: its norms / MLP on fla's kernels)

Writes ONE JSON (``--out``; default ``$OUT/gpu_check.json``, else outputs/gpu_check/gpu_check.json)
with the environment, every part's exit status, seconds, timeout flag, log tail and result, and
``ok`` (every part finished and every parity check passed). Each setting of refine_step carries
``plan_gib``: the memory plan's prediction of that peak (issue 23 point 4,
``refine_ray.system.memory_plan.local_step_peak``), to be compared with the measured ``peak_gib``.

``--cpu-smoke`` runs the same parts on CPU at tiny sizes (parity: the torch path on both sides;
REFINE step: a tiny DeltaNet, 512 tokens, float32): the test suite runs it so this file is tested.
Exit status: 0 ok, 1 a check failed or a part did not finish, 2 prerequisites missing.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

# (name, seconds on the GPU machine): 430 s of the 8-minute run, the rest for start-up and imports
PARTS = [("parity_delta_net", 110), ("refine_step", 170), ("parity_gated_deltanet", 90), ("parity_lact", 60)]
GPU_MODULES = ("torch", "triton", "transformers", "yaml", "numpy", "einops", "fla", "fla.ops.delta_rule",
               "fla.ops.gated_delta_rule", "transformers.initialization", "refine_ray.models.deltanet")
SMOKE_FIELDS = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, intermediate_size=128, vocab_size=512)


def environment(cpu_smoke: bool) -> tuple[dict, list[str]]:
    """(versions, device and GPU memory; missing prerequisites as 'module (error)' lines)."""
    env, missing = {"python": sys.version.split()[0]}, []
    for name in GPU_MODULES if not cpu_smoke else ("torch", "transformers", "fla", "refine_ray.models.deltanet"):
        try:
            module = importlib.import_module(name)
            if "." not in name:
                env[name] = getattr(module, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - any import failure is a missing prerequisite
            missing.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
    try:
        import torch

        env["cuda"] = torch.cuda.is_available()
        if env["cuda"]:
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        elif not cpu_smoke:
            missing.append("a CUDA device (torch.cuda.is_available() is False)")
    except ImportError:
        pass
    return env, missing


def run_part(name: str, timeout_s: float, args, workdir: str) -> dict:
    """Run one part in a subprocess with ``timeout_s``; its result JSON (written as it goes) is
    kept even when it times out."""
    result_path = os.path.join(workdir, f"{name}.json")
    if name.startswith("parity_"):
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "gpu_model_parity.py"), "--only",
               name.removeprefix("parity_"), "--json", result_path]
        cmd += ["--cpu", "--T", "80", "--hidden", "64"] if args.cpu_smoke else []
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--json", result_path,
               "--deadline", str(time.time() + timeout_s - 5)] + (["--cpu-smoke"] if args.cpu_smoke else [])
    print(f"=== {name} (limit {timeout_s:.0f} s): {' '.join(cmd[1:])}", flush=True)
    t0, timed_out, rc, out = time.time(), False, None, ""
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if args.cpu_smoke else {}))   # 2 threads thrash shared cores
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        timed_out = True
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    seconds = round(time.time() - t0, 1)
    lines = [ln for ln in out.splitlines() if "warn" not in ln.lower()]
    print("\n".join(lines[-25:]), flush=True)
    print(f"=== {name}: {'TIMED OUT' if timed_out else f'exit {rc}'} after {seconds} s", flush=True)
    result = None
    if os.path.isfile(result_path):
        with open(result_path) as f:
            result = json.load(f)
    return {"rc": rc, "seconds": seconds, "timed_out": timed_out, "log_tail": "\n".join(lines[-40:]),
            "result": result}


# ------------------------------------------------------------------ the REFINE step part
def refine_step_part(args) -> int:
    """Measure NTP and REFINE steps with checkpointing off then on; write ``args.json`` after every step."""
    import torch

    from refine_ray.config import ExperimentConfig, from_dict, read_config_file
    from refine_ray.models import registry
    from refine_ray.models.base import enable_checkpointing
    from refine_ray.refine.local_step import LocalRefineStep
    from refine_ray.system.memory_plan import local_step_peak
    from bench_nsp import SIZES                         # scripts/: the named model sizes

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    fields = SMOKE_FIELDS if smoke else SIZES["deltanet-340m"]
    L, reps = (512, 1) if smoke else (16384, 2)
    paper = from_dict(ExperimentConfig, read_config_file(os.path.join(ROOT, "configs", "base", "paper.yaml")), "")
    cfg = paper.refine                                   # n=8, G=1, k=5, cosine on policy hidden, prefix sharing
    torch.manual_seed(0)
    with torch.device(device):
        model = registry.build_model("delta_net", **fields).to(dtype).train()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, fields["vocab_size"], (L,), generator=torch.Generator().manual_seed(1)).to(device)
    out = {"model": dict(type="delta_net", **fields, parameters=params), "tokens": L, "dtype": str(dtype).split(".")[1],
           "device": str(device), "refine": dict(n_chunks=cfg.n_chunks, samples_per_prefix=cfg.samples_per_prefix,
                                                 response_length=cfg.response_length, reward=cfg.reward,
                                                 reward_source=cfg.reward_source, prefix_sharing=cfg.prefix_sharing),
           "optimizer": f"AdamW on the {str(dtype).split('.')[1]} weights (the DeepSpeed learner adds fp32 master "
                        f"weights and Adam state)", "reps": reps, "settings": {}}

    def save():
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)

    def timed(step: LocalRefineStep, mode: str) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step.step([ids], mode=mode)
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return time.perf_counter() - t0, peak

    for setting in ("checkpointing_off", "checkpointing_on"):
        if setting == "checkpointing_on":
            enable_checkpointing(model)
        step = LocalRefineStep(model, torch.optim.AdamW(model.parameters(), lr=1e-6), cfg, grad_clip=1.0)
        plan = local_step_peak(model.config, L, cfg.n_chunks, cfg.samples_per_prefix, cfg.response_length, dtype,
                               "fla" if device.type == "cuda" else "torch", setting == "checkpointing_on")
        res = out["settings"][setting] = {"ntp_s": [], "refine_s": [], "peak_gib": {}, "warmup_s": {},
                                          "plan_gib": round(plan / 2**30, 3)}   # the memory plan's REFINE peak
        try:
            for mode in ("ntp", "refine"):                   # warm-up: Triton compiles / autotunes here
                res["warmup_s"][mode] = round(timed(step, mode)[0], 3)
                save()
            for rep in range(reps):
                for mode in (("ntp", "refine") if rep % 2 == 0 else ("refine", "ntp")):
                    if time.time() > args.deadline:
                        res["stopped"] = "time budget"
                        save()
                        return 1
                    seconds, peak = timed(step, mode)
                    res[f"{mode}_s"].append(round(seconds, 4))
                    if peak is not None:                    # GPU only (CPU: bench_checkpointing.py)
                        res["peak_gib"][mode] = round(max(peak, res["peak_gib"].get(mode, 0.0)), 3)
                    save()
        except torch.cuda.OutOfMemoryError as e:
            res["oom"] = str(e).splitlines()[0]
        finally:
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if res["ntp_s"] and res["refine_s"]:
            res["refine_over_ntp"] = round(statistics.median(res["refine_s"]) / statistics.median(res["ntp_s"]), 3)
        print(f"{setting}: " + json.dumps({k: v for k, v in res.items() if k != "warmup_s"}), flush=True)
        save()
    peaks = [out["settings"][s]["peak_gib"].get("refine") for s in ("checkpointing_off", "checkpointing_on")]
    if all(peaks):
        out["refine_peak_on_over_off"] = round(peaks[1] / peaks[0], 3)
    save()
    return 0


# ------------------------------------------------------------------ the driver
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT") or os.path.join(ROOT, "outputs", "gpu_check"),
                                                  "gpu_check.json"))
    ap.add_argument("--budget-s", type=float, default=None, help="all parts together (default 450; smoke 1200)")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same parts on CPU at tiny sizes")
    ap.add_argument("--part", choices=["refine_step"], help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        return refine_step_part(args)
    t_start = time.time()
    budget = args.budget_s or (1200.0 if args.cpu_smoke else 450.0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    env, missing = environment(args.cpu_smoke)
    report = {"command": "bash scripts/gpu_check.sh" + (" --cpu-smoke" if args.cpu_smoke else ""),
              "cpu_smoke": args.cpu_smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget,
              "environment": env, "missing": missing, "parts": {}}
    if missing:
        print("\n".join(f"MISSING: {m}" for m in missing))
    else:
        workdir = tempfile.mkdtemp(prefix="gpu_check_")      # the parts' own files; the report holds them
        spare = 0.0
        for name, seconds in PARTS:
            share = seconds if not args.cpu_smoke else budget / len(PARTS)
            limit = min(share + spare, budget - (time.time() - t_start))
            if limit < 10:
                report["parts"][name] = {"skipped": "no time left"}
                continue
            part = report["parts"][name] = run_part(name, limit, args, workdir)
            spare = max(0.0, limit - part["seconds"])
    parity = [p["result"] for n, p in report["parts"].items() if n.startswith("parity_") and p.get("result")]
    report["parity_failures"] = [f for r in parity for f in r["failures"]]
    report["ok"] = bool(not missing and len(report["parts"]) == len(PARTS) and
                        all(p.get("rc") == 0 for p in report["parts"].values()) and not report["parity_failures"])
    report["elapsed_s"] = round(time.time() - t_start, 1)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'OK' if report['ok'] else 'NOT OK'} in {report['elapsed_s']} s; wrote {os.path.abspath(args.out)}")
    return 2 if missing else (0 if report["ok"] else 1)


if __name__ == "__main__":
    sys.exit(main())

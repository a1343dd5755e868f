#!/usr/bin/env python
"""The memory plan's activation model against the measured peak of a learner step on CPU.

For each model size, length L and checkpointing off/on: the plan's activation bytes of one learner
document step (``refine_ray.system.memory_plan.learner_activations``, our PyTorch kernels, fp32) and
the measured peak of that step: ``refine.loss.document_loss`` with prefix sharing (n=8 cuts, G=1,
k=5), then backward, on a random model whose gradients already exist (a warm-up step made them, so
the rise is activations only). Measured as ``scripts/bench_checkpointing.py`` does (``bench_nsp.Meter``:
the peak-RSS rise of the step above its start, VmHWM reset after ``malloc_trim``), in a process
started with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``): every tensor is
then its own mapping, returned when freed, so RSS follows the live tensors as
``torch.cuda.max_memory_allocated`` does on a GPU instead of keeping freed heap (the script
re-executes itself with it). Median over ``--reps`` after one warm-up step per model.

    .venv/bin/python scripts/bench_memory_plan.py                        # 2 sizes x 2 lengths x off/on
    .venv/bin/python scripts/bench_memory_plan.py --json out.json        # tests/system/test_memory_plan.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]
MMAP_THRESHOLD = "65536"

# name -> model fields (random models; vocabularies large enough that the LM head matters)
SIZES = {"a": dict(hidden_size=256, num_hidden_layers=4, num_heads=4, vocab_size=4096),
         "b": dict(hidden_size=512, num_hidden_layers=2, num_heads=8, vocab_size=8192)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-type", default="delta_net")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:        # must be set before the process starts
        os.execve(sys.executable, [sys.executable] + sys.argv,
                  dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, OMP_NUM_THREADS="1"))

    import torch

    from bench_checkpointing import learner_inputs
    from bench_nsp import Meter
    from refine_ray.config import RefineConfig
    from refine_ray.models import registry
    from refine_ray.models.base import enable_checkpointing
    from refine_ray.refine.loss import document_loss
    from refine_ray.system.memory_plan import learner_activations

    torch.set_num_threads(1)
    meter = Meter(torch.device("cpu"))
    if not meter.rss_ok:
        print("cannot reset the peak RSS here (/proc/self/clear_refs)")
        return 2
    cfg = RefineConfig(n_chunks=8, samples_per_prefix=1, response_length=5, prefix_sharing=True)
    rows = []
    for size in args.sizes:
        fields = SIZES[size]
        config = registry.tiny_config(args.model_type, **fields)
        for checkpointing in (False, True):
            model = registry.build_model(args.model_type, seed=0, **fields).train()
            if checkpointing:
                enable_checkpointing(model)
            for i, L in enumerate(args.lengths):
                inputs = learner_inputs(L, cfg, fields["vocab_size"], seed=L)
                rises = []
                for rep in range(args.reps + (i == 0)):           # the model's first step: warm-up (its gradients)
                    meter.start()
                    loss, _ = document_loss(model, *inputs, cfg)
                    loss.backward()
                    del loss
                    rises.append(meter.stop()[3])
                rises = rises[i == 0:]
                plan = learner_activations(config, L, cfg.n_chunks, cfg.samples_per_prefix, cfg.response_length,
                                           torch.float32, "torch", checkpointing)
                measured = statistics.median(rises)
                rows.append(dict(size=size, **fields, length=L, checkpointing=checkpointing,
                                 plan_mib=round(sum(plan.values()) / 2**20, 1), measured_mib=round(measured, 1),
                                 spread_mib=[round(min(rises), 1), round(max(rises), 1)],
                                 ratio=round(sum(plan.values()) / 2**20 / measured, 3),
                                 parts_mib={k: round(v / 2**20, 1) for k, v in plan.items()}))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| size | L | checkpointing | plan MiB | measured MiB (min-max) | plan / measured |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}: hidden {r['hidden_size']}, {r['num_hidden_layers']} layers, vocab {r['vocab_size']} "
              f"| {r['length']} | {'on' if r['checkpointing'] else 'off'} | {r['plan_mib']:.0f} "
              f"| {r['measured_mib']:.0f} "
              f"({r['spread_mib'][0]:.0f}-{r['spread_mib'][1]:.0f}) | {r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

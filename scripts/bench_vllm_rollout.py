"""Per-sample rollout cost: vLLM (plugin; prefix caching on / off) vs the cached-state fast-weight engine.

    nice .venv-vllm/bin/python scripts/bench_vllm_rollout.py                 # CPU: tiny GatedDeltaNet, fp32
    .venv-vllm/bin/python scripts/bench_vllm_rollout.py --gpu                # CUDA: the paper's setting (below)
    .venv-vllm/bin/python scripts/bench_vllm_rollout.py --model-type delta_net --prefix 512 2048 \\
        --hidden-size 1024 --layers 12 --heads 8                             # any shape

Each setting is one batch of ``--docs`` documents of random token ids, ``--cuts`` cuts spread
over ``prefix`` tokens, G samples of k tokens per cut (REFINE's short continuations: the paper's
k=5, n=8 cuts, G=1, and G=4), then long answers (``--long``: G=1, one cut at the prefix). The
three engines (vLLM with prefix caching, what ``rollout.backend=vllm`` runs: a warm-up request
per prefix, then seeded requests; vLLM without caching, unseeded; the fast-weight engine) are
all built first, then every setting is timed ``--repeats`` times after one warm-up batch, the
engines interleaved within each repeat (order rotated), so load on a shared machine falls on all
of them alike. Printed per engine: seconds per sample, median [min, max] over the repeats, and
the ratio to the fast-weight engine computed per repeat (the times of one repeat side by side),
median [min, max]. The fast-weight engine runs in this process with ``--threads`` torch threads
(default 1, as in a rollout actor with num_cpus=1; vLLM's CPU engine core also serves with one):
with 2 threads on a loaded 2-core machine its OpenMP threads contend and single timings vary by
tens of times. Both engines prefill every prefix (the fast-weight engine here without the
scorer's cut states, i.e. not REFINE's prefix-sharing path); engine start-up is excluded.

``--gpu`` (needs CUDA and the CUDA vLLM, ``scripts/setup_vllm.sh --cuda``): DeltaNet-1.3B's shape
(hidden 2048, 24 layers, 16 heads of 128) with random weights in bf16, vocabulary 32000,
prefixes 4096 and 16384 (the paper's 16K context), 8 documents per batch, k=5, n=8, G=1 and 4,
answers of 32 tokens (post-training's max_response_length); vLLM runs its Triton GDN kernels
and CUDA graphs. Flags given with ``--gpu`` override its values.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from refine_ray.models.registry import VLLM_TYPES, family

GPU_PRESET = dict(model_type="delta_net", hidden_size=2048, layers=24, heads=16, dtype="bfloat16", vocab=32000,
                  prefix=[4096, 16384], docs=8, cuts=8, k=5, long=[32])


def _batch(docs: int, prefix: int, cuts: int, k: int, vocab: int, step: int):
    from refine_ray.transport.batches import DocBatch, ScoredBatch

    rng = np.random.default_rng(step)
    ids = [rng.integers(0, vocab, prefix + k) for _ in range(docs)]
    c = np.tile(np.linspace(prefix // cuts, prefix, cuts).astype(np.int64), (docs, 1))
    n = c.size
    return ScoredBatch(docs=DocBatch.from_lists(list(range(docs)), ids), cuts=c, gt_ids=np.zeros((n, k), np.int64),
                       gt_hidden=np.zeros((n, k, 1), np.float32), cut_entropy=np.zeros(n, np.float32), step=step)


def _run(engine, batch) -> float:
    """Seconds for one batch (synchronised on CUDA)."""
    t = time.perf_counter()
    if hasattr(engine, "sample_document"):     # FastWeightRollout: one document at a time
        for d in range(len(batch.docs)):
            engine.sample_document(torch.from_numpy(batch.docs.doc(d)), torch.from_numpy(batch.cuts[d]), batch.k,
                                   batch.step, d)
    else:
        engine.generate(batch, 0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _spread(xs: list[float], fmt: str) -> str:
    return f"{format(statistics.median(xs), fmt)} [{format(min(xs), fmt)}, {format(max(xs), fmt)}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    served = [t for t in VLLM_TYPES if family(t).fast_weight]      # the plugin's delta-rule families
    p.add_argument("--gpu", action="store_true", help="the paper's setting on a CUDA GPU (see the doc)")
    p.add_argument("--model-type", default="gated_deltanet", choices=served)
    p.add_argument("--prefix", type=int, nargs="+", default=[128, 512])
    p.add_argument("--docs", type=int, default=1)
    p.add_argument("--cuts", type=int, default=8)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--long", type=int, nargs="*", default=[32, 128])
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the fast-weight engine (default 1: a rollout actor's num_cpus=1, and "
                        "vLLM's engine core serves with 1 thread on CPU)")
    a = p.parse_args()
    if a.gpu:                     # the preset, then every flag the command line gives
        p.set_defaults(**GPU_PRESET)
        a = p.parse_args()
        if not torch.cuda.is_available():
            p.error("--gpu: no CUDA device visible")
    if a.repeats < 1 or a.threads < 1:
        p.error("--repeats / --threads: expected at least 1")
    torch.set_num_threads(a.threads)
    if not torch.cuda.is_available():
        # two CPU engines live at once: each reserves REFINE_VLLM_MEM of the machine's memory
        os.environ.setdefault("REFINE_VLLM_MEM", "0.05")

    from refine_ray.config import DataConfig, ExperimentConfig, ModelConfig, RefineConfig
    from refine_ray.refine.policy import build_policy
    from refine_ray.refine.sampling import FastWeightRollout
    from refine_ray.serving.vllm_rollout import VLLMRollout

    longest = max([a.k, *a.long])

    def cfg(G, k):
        return ExperimentConfig(model=ModelConfig(type=a.model_type, hidden_size=a.hidden_size,
                                                  num_hidden_layers=a.layers, num_heads=a.heads, dtype=a.dtype),
                                refine=RefineConfig(samples_per_prefix=G, response_length=k, prefix_sharing=False),
                                data=DataConfig(max_length=max(a.prefix) + 8))

    settings = ([(G, a.k, a.cuts, P) for G in (1, 4) for P in a.prefix]
                + [(1, L, 1, P) for L in a.long for P in a.prefix])
    base = cfg(4, longest)
    engines = {"vllm+cache": VLLMRollout(base.model, base.refine, base.data.max_length, a.vocab, base.train.seed,
                                         prefix_caching=True),
               "vllm": VLLMRollout(base.model, base.refine, base.data.max_length, a.vocab, base.train.seed,
                                   prefix_caching=False)}
    policy = build_policy(base.model, a.vocab).eval()
    device = next(policy.parameters()).device
    print(f"# {a.model_type} hidden {a.hidden_size}, {a.layers} layers, {a.heads} heads, {a.dtype}, vocab {a.vocab}, "
          f"{a.docs} doc(s)/batch, {a.repeats} repeats, {a.threads} fast-weight thread(s), device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print("| G | k | cuts/doc | prefix | engine | s/sample median [min, max] | vs fast_weight median [min, max] |")
    print("|---|---|---|---|---|---|---|")
    for G, k, cuts, P in settings:
        for eng in engines.values():
            eng.cfg = cfg(G, k)
        engines["fast_weight"] = FastWeightRollout(policy, cfg(G, k).refine)
        samples = a.docs * cuts * G
        batches = [_batch(a.docs, P, cuts, k, a.vocab, step) for step in range(a.repeats + 1)]
        names = list(engines)
        for name in names:                       # warm-up (fills vLLM's prefix cache for the "+cache" engine)
            _run(engines[name], batches[0])
        times = {name: [] for name in names}
        with torch.no_grad():
            for r in range(a.repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times[name].append(_run(engines[name], batches[r + 1]) / samples)
        fw = times["fast_weight"]
        for name in names:
            ratio = [t / f for t, f in zip(times[name], fw)]
            print(f"| {G} | {k} | {cuts} | {P} | {name} | {_spread(times[name], '.4f')} | {_spread(ratio, '.2f')}x |",
                  flush=True)
    for eng in engines.values():
        if hasattr(eng, "close"):
            eng.close()


if __name__ == "__main__":
    main()

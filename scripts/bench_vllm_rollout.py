"""Per-sample rollout cost: vLLM (plugin; prefix caching on / off) vs the cached-state fast-weight engine.

    .venv-vllm/bin/python scripts/bench_vllm_rollout.py                      # tiny GatedDeltaNet, CPU
    .venv-vllm/bin/python scripts/bench_vllm_rollout.py --model-type delta_net --prefix 512 2048 \\
        --hidden-size 1024 --layers 12 --heads 8                               # larger, e.g. on a GPU

One document of random token ids, ``--cuts`` cuts spread over ``prefix`` tokens, G samples of
k tokens per cut (REFINE's short continuations: k=5, n=8, G=1 and 4), then long answers
(``--long``: 32..512 tokens, G=1, one cut at the prefix length). Each setting is timed after one
warm-up call; the printed ratio is vLLM time / fast-weight time per sample (both re-encode the
prefixes: the fast-weight engine here prefills, it does not get the scorer's cut states).
All numbers come from one run, on one machine.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from refine_ray.models.registry import VLLM_TYPES, family


def _batch(prefix: int, cuts: int, k: int, vocab: int, step: int):
    from refine_ray.system.batches import DocBatch, ScoredBatch

    doc = np.random.default_rng(0).integers(0, vocab, prefix + k)
    c = np.linspace(prefix // cuts, prefix, cuts).astype(np.int64)[None]
    n = c.size
    return ScoredBatch(docs=DocBatch.from_lists([0], [doc]), cuts=c, gt_ids=np.zeros((n, k), np.int64),
                       gt_hidden=np.zeros((n, k, 1), np.float32), cut_entropy=np.zeros(n, np.float32), step=step)


def _time(engine, prefix, cuts, k, vocab) -> float:
    """Seconds for one batch, after one warm-up batch (which also fills vLLM's prefix cache)."""
    def run(step):
        batch = _batch(prefix, cuts, k, vocab, step)
        if hasattr(engine, "sample_document"):     # FastWeightRollout: one document at a time
            engine.sample_document(torch.from_numpy(batch.docs.doc(0)), torch.from_numpy(batch.cuts[0]), k, step, 0)
        else:
            engine.generate(batch, 0)
    run(0)
    t = time.perf_counter()
    run(1)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    served = [t for t in VLLM_TYPES if family(t).fast_weight]      # the plugin's delta-rule families
    p.add_argument("--model-type", default="gated_deltanet", choices=served)
    p.add_argument("--prefix", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--cuts", type=int, default=8)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--long", type=int, nargs="*", default=[32, 128, 512])
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    a = p.parse_args()

    from refine_ray.config import DataConfig, ExperimentConfig, ModelConfig, RefineConfig
    from refine_ray.refine.policy import build_policy
    from refine_ray.refine.sampling import FastWeightRollout
    from refine_ray.serving.vllm_rollout import VLLMRollout

    vocab, longest = 1024, max([a.k, *a.long])
    rows = []

    def cfg(G, k):
        return ExperimentConfig(model=ModelConfig(type=a.model_type, hidden_size=a.hidden_size,
                                                  num_hidden_layers=a.layers, num_heads=a.heads),
                                refine=RefineConfig(samples_per_prefix=G, response_length=k, prefix_sharing=False),
                                data=DataConfig(max_length=max(a.prefix) + 8))

    settings = [(G, a.k, a.cuts, P) for G in (1, 4) for P in a.prefix] + [(1, L, 1, P) for L in a.long for P in a.prefix]
    policy = build_policy(cfg(1, a.k).model, vocab, "cuda" if torch.cuda.is_available() else "cpu").eval()
    for caching in (True, False):
        base = cfg(4, longest)
        base.refine.response_length = longest
        engine = VLLMRollout(base, vocab, prefix_caching=caching)
        for G, k, cuts, P in settings:
            engine.cfg = cfg(G, k)
            n = cuts * G
            rows.append(("vllm" + ("+cache" if caching else ""), G, k, cuts, P, _time(engine, P, cuts, k, vocab) / n))
        engine.close()
    for G, k, cuts, P in settings:
        fw = FastWeightRollout(policy, cfg(G, k).refine)
        rows.append(("fast_weight", G, k, cuts, P, _time(fw, P, cuts, k, vocab) / (cuts * G)))
    fw_s = {r[1:5]: r[5] for r in rows if r[0] == "fast_weight"}
    print("| engine | G | k | cuts | prefix | s/sample | vs fast_weight |\n|---|---|---|---|---|---|---|")
    for name, G, k, cuts, P, s in rows:
        print(f"| {name} | {G} | {k} | {cuts} | {P} | {s:.4f} | {s / fw_s[(G, k, cuts, P)]:.2f}x |")


if __name__ == "__main__":
    main()

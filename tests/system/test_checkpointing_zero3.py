"""Activation checkpointing under DeepSpeed ZeRO-3 with 2 ranks (issue 23 point 1).

Two real learner ranks (``roles.learner.LearnerRankRole``: DeepSpeed ZeRO-3 over gloo), each in its own spawned
process, run one ``train_step`` on their own document with ``model.gradient_checkpointing`` off
and on. Every rank's loss and the gradient shard its optimizer steps on (ZeRO-3's fp32 shard of
every parameter's gradient, reduced over both ranks) are equal: bitwise in practice (the
recompute runs the same ops), asserted within float rounding of the reduction. The default test
runs DeltaNet's prefix-shared path (one trunk pass with kept states, branches from them); the
slow one adds the re-encode path, Llama (the trunk split at the cuts, KV states) and LaCT
(tests/system/test_lact_zero3.py checks LaCT's ZeRO-3 gradients against one process).
"""
import multiprocessing as mp
import os
import socket
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

V = 89


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int, n: int, G: int, k: int):
    """Rank ``rank``'s one-document LearnBatch."""
    from refine_ray.transport.batches import DocBatch, LearnBatch

    g = np.random.default_rng(10 + rank)
    L = 150 + 40 * rank                                     # ranks with documents of different lengths
    cuts = np.sort(g.choice(np.arange(20, L - k), n, replace=False))[None]
    rows = n * G
    return LearnBatch(docs=DocBatch.from_lists([rank], [g.integers(0, V, L)]), cuts=cuts,
                      responses=g.integers(0, V, (rows, k)), samples_per_prefix=G,
                      old_logprobs=(-3.0 - g.random((rows, k))).astype(np.float32),
                      advantages=g.standard_normal(rows).astype(np.float32))


def _rank(rank: int, world: int, port: int, out: str, cases: list) -> None:
    """One learner rank: per case (model_type, prefix_sharing) a train_step with checkpointing
    off, then on; saves the losses and gradient shards."""
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from refine_ray.config import (DataConfig, ExperimentConfig, LearnerConfig, ModelConfig, OptimConfig,
                                   RefineConfig)
    from roles.learner import LearnerRankRole

    refine_cfg = RefineConfig(n_chunks=3, response_length=4, samples_per_prefix=2)
    results = {}
    for model_type, shared in cases:
        for ckpt in (False, True):
            cfg = ExperimentConfig(
                model=ModelConfig(type=model_type, seed=3, gradient_checkpointing=ckpt),
                data=DataConfig(batch_size=world), refine=replace(refine_cfg, prefix_sharing=shared),
                learner=LearnerConfig(num_ranks=world, zero_stage=3), optim=OptimConfig(lr=1e-3, grad_clip=1e6))
            learner = LearnerRankRole(cfg, rank, world)
            learner.init("127.0.0.1", port, V)
            shards: list[torch.Tensor] = []
            learner.optimizer.optimizer.register_step_pre_hook(    # ZeRO-3's fp32 shards, before AdamW
                lambda opt, *_: shards.extend(p.grad.detach().clone() for g in opt.param_groups for p in g["params"]))
            metrics = learner.train_step(_batch(rank, refine_cfg.n_chunks, refine_cfg.samples_per_prefix,
                                                refine_cfg.response_length))
            assert shards, "the optimizer stepped"
            results[(model_type, shared, ckpt)] = (metrics["loss"], torch.cat([s.flatten() for s in shards]))
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def _check(tmp_path, cases: list) -> None:
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(tmp_path), cases)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0], "a learner rank failed (its traceback is above)"
    for r in range(2):
        results = torch.load(tmp_path / f"rank{r}.pt")
        for model_type, shared in cases:
            (loss_a, grad_a), (loss_b, grad_b) = (results[(model_type, shared, c)] for c in (False, True))
            assert loss_a == loss_b, (r, model_type, shared)
            assert grad_a.numel() > 0 and grad_a.abs().max() > 0
            torch.testing.assert_close(grad_b, grad_a, rtol=0, atol=1e-6 * float(grad_a.abs().max()),
                                       msg=f"rank {r} {model_type} shared={shared}")


def test_zero3_two_ranks_checkpointing_gives_equal_loss_and_gradients(tmp_path):
    _check(tmp_path, [("delta_net", True)])


@pytest.mark.slow
def test_zero3_two_ranks_checkpointing_every_trunk_kind_and_reencode(tmp_path):
    _check(tmp_path, [("delta_net", False), ("llama", True), ("lact", True)])

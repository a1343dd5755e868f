"""LaCT under DeepSpeed ZeRO-3 with ranks whose documents differ in length.

ZeRO-3 gathers a module's weights with a collective when backward reaches the module, so every
rank must reach the modules in the same order. LaCT's chunked fast-weight scan and its window /
pending-chunk state gave backward a data-dependent graph, so ranks with documents of different
lengths gathered in different orders and gloo aborted ("Received data size doesn't match expected
size"). Two real learner ranks (``roles.learner.LearnerRankRole``: DeepSpeed ZeRO-3 over gloo, spawned processes)
train one REFINE step (prefix-shared trunk split at the cuts, branches, NTP loss) on documents of
150 and 190 tokens whose cuts fall at different chunk phases; the full gradient each rank's
optimizer steps on must equal the mean of the two documents' gradients computed in one process
without DeepSpeed. The slow test runs it with activation checkpointing and on the re-encode path.
"""
import multiprocessing as mp
import os
import socket
import warnings

import numpy as np
import pytest
import torch

V = 89
MODEL = dict(type="lact", seed=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int):
    """Rank ``rank``'s one-document LearnBatch: 150 + 40 * rank tokens, 3 cuts, G=2, k=4."""
    from refine_ray.transport.batches import DocBatch, LearnBatch

    g = np.random.default_rng(10 + rank)
    L, n, G, k = 150 + 40 * rank, 3, 2, 4
    cuts = np.sort(g.choice(np.arange(20, L - k), n, replace=False))[None]
    return LearnBatch(docs=DocBatch.from_lists([rank], [g.integers(0, V, L)]), cuts=cuts,
                      responses=g.integers(0, V, (n * G, k)), samples_per_prefix=G,
                      old_logprobs=(-3.0 - g.random((n * G, k))).astype(np.float32),
                      advantages=g.standard_normal(n * G).astype(np.float32))


def _config(world: int, shared: bool, checkpointing: bool):
    from refine_ray.config import (DataConfig, ExperimentConfig, LearnerConfig, ModelConfig, OptimConfig,
                                   RefineConfig)

    return ExperimentConfig(
        model=ModelConfig(**MODEL, gradient_checkpointing=checkpointing), data=DataConfig(batch_size=world),
        refine=RefineConfig(n_chunks=3, response_length=4, samples_per_prefix=2, prefix_sharing=shared),
        learner=LearnerConfig(num_ranks=world, zero_stage=3, collective_timeout_s=120),
        optim=OptimConfig(lr=1e-3, grad_clip=1e6))


def _rank(rank: int, world: int, port: int, out: str, shared: bool, checkpointing: bool) -> None:
    """One learner rank: one train_step on its own document; saves every parameter's full fp32
    gradient as its optimizer sees it (ZeRO-3's reduced shards, gathered: a collective, so both
    ranks gather in the optimizer's pre-step hook, in the same order)."""
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from deepspeed.utils import safe_get_full_grad

    from roles.learner import LearnerRankRole

    learner = LearnerRankRole(_config(world, shared, checkpointing), rank, world)
    learner.init("127.0.0.1", port, V)
    grads = {}
    learner.optimizer.optimizer.register_step_pre_hook(lambda *_: grads.update(
        (name, safe_get_full_grad(p).detach().clone()) for name, p in learner.module.named_parameters()))
    metrics = learner.train_step(_batch(rank))
    torch.save({"loss": metrics["loss"], "grads": grads}, os.path.join(out, f"rank{rank}.pt"))


def _reference(shared: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-document losses and the mean gradient of both documents, in one process, no DeepSpeed."""
    from refine_ray.algo import head_calls
    from refine_ray.refine.loss import document_loss
    from refine_ray.refine.policy import build_policy

    cfg = _config(2, shared, False)
    model = build_policy(cfg.model, V)
    batches = [_batch(r) for r in range(2)]
    calls = max(head_calls(len(b.docs.doc(0)) - 1) for b in batches)        # the learner's _max_over_ranks
    losses = []
    for b in batches:
        loss, _ = document_loss(model, torch.from_numpy(b.docs.doc(0)), torch.from_numpy(b.cuts[0]),
                                torch.from_numpy(b.responses), torch.from_numpy(b.old_logprobs),
                                torch.from_numpy(b.advantages), cfg.refine, ntp_head_calls=calls)
        (loss / 2).backward()
        losses.append(float(loss.detach()))
    return losses, {name: p.grad for name, p in model.named_parameters()}


def _check(tmp_path, shared: bool, checkpointing: bool) -> None:
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(tmp_path), shared, checkpointing)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0], "a learner rank failed (its traceback is above)"
    losses, expected = _reference(shared)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["loss"] == pytest.approx(losses[r], rel=1e-5)
        assert set(got["grads"]) == set(expected)
        for name, g in expected.items():
            assert g.abs().max() > 0, name
            torch.testing.assert_close(got["grads"][name].view_as(g), g, rtol=1e-4, atol=1e-6 * float(g.abs().max()),
                                       msg=f"rank {r} {name}")


def test_lact_zero3_ranks_with_documents_of_different_lengths(tmp_path):
    _check(tmp_path, shared=True, checkpointing=False)


@pytest.mark.slow
@pytest.mark.parametrize("shared,checkpointing", [(True, True), (False, False)])
def test_lact_zero3_different_lengths_checkpointing_and_reencode(tmp_path, shared, checkpointing):
    _check(tmp_path, shared, checkpointing)

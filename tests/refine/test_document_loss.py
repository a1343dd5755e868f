"""The per-document REFINE loss exists once (refine.loss.document_loss): the DeepSpeed learner
(ZeRO 0, one rank on gloo, in this process) and the single-process step (LocalRefineStep, test-time
training) give identical losses and gradients on the same documents, cuts, responses, behaviour
log-probs and advantages.

Both accumulate one backward per document of ``loss / documents`` (DeepSpeed divides by its
gradient-accumulation steps, one per document); gradients are read by a step pre-hook on each
optimizer, i.e. after accumulation and clipping (a clip far above the norm leaves them as they are).
"""
import os
import socket

import numpy as np
import pytest
import torch

from refine_ray.config import DataConfig, ExperimentConfig, LearnerConfig, ModelConfig, OptimConfig, RefineConfig
from refine_ray.refine.local_step import LocalRefineStep
from refine_ray.refine.policy import build_policy
from refine_ray.transport.batches import DocBatch, LearnBatch

V = 89
REFINE = RefineConfig(n_chunks=3, response_length=4, samples_per_prefix=3, min_prefix=8, temperature=0.8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def learner():
    """A one-rank learner (DeepSpeed ZeRO 0 over gloo) in this process."""
    from roles.learner import LearnerRankRole

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cfg = ExperimentConfig(model=ModelConfig(type="delta_net", seed=3), data=DataConfig(batch_size=2),
                           refine=REFINE, learner=LearnerConfig(num_ranks=1, zero_stage=0),
                           optim=OptimConfig(lr=1e-3, grad_clip=1e6))
    learner = LearnerRankRole(cfg, rank=0, world_size=1)
    learner.init(env["MASTER_ADDR"], int(env["MASTER_PORT"]), V)
    yield learner
    torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _capture(optimizer, model) -> dict[str, torch.Tensor]:
    """The gradients each ``optimizer.step()`` sees, by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def hook(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[names[id(p)]] = p.grad.detach().clone()
    optimizer.register_step_pre_hook(hook)
    return grads


def test_learner_and_local_step_give_identical_loss_and_gradients(learner):
    cfg = learner.cfg
    model = build_policy(cfg.model, V)                   # the learner's initial weights (seeded)
    for (n, a), (_, b) in zip(model.named_parameters(), learner.module.named_parameters()):
        assert torch.equal(a, b), n
    model.train()
    local = LocalRefineStep(model, torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr), cfg.refine,
                            grad_clip=cfg.optim.grad_clip, seed=5)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, V, (n,), generator=g) for n in (70, 101)]
    exp = local.collect(docs, [0, 1])                    # cuts, samples, rewards, advantages
    assert exp.advantages.abs().sum() > 0
    batch = LearnBatch(docs=DocBatch.from_lists([0, 1], [d.numpy() for d in docs]),
                       cuts=np.stack([c.numpy() for c in exp.cuts]), responses=exp.responses.numpy(),
                       old_logprobs=exp.old_logprobs.numpy(), advantages=exp.advantages.numpy(),
                       samples_per_prefix=cfg.refine.samples_per_prefix)
    learner_grads = _capture(learner.optimizer, learner.module)
    local_grads = _capture(local.optimizer, model)
    learned = learner.train_step(batch)
    stepped = local.update(docs, exp)
    for name in ("loss", "ntp_loss", "pg_loss", "clipfrac", "approx_kl"):
        assert learned[name] == stepped[name], name
    assert learner_grads.keys() == local_grads.keys() and len(local_grads) == len(list(model.parameters()))
    for name, grad in local_grads.items():
        assert torch.equal(learner_grads[name], grad), name


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_ntp_loss_of_a_40_and_a_160_token_document(agg):
    """Issue 24 point 3: the reference's NTP loss over its micro-batch of two documents (40 and 160
    tokens: 39 + 159 targets) is the cross-entropy pooled over their tokens (the issue measured
    4.5883 against our 4.5837 mean of the two documents' means). Both, from full logits here."""
    from dataclasses import replace

    import torch.nn.functional as F

    model = build_policy(ModelConfig(type="delta_net", seed=3), V).train()
    g = torch.Generator().manual_seed(7)
    docs = [torch.randint(0, V, (n,), generator=g) for n in (40, 160)]
    with torch.no_grad():
        per_token = [F.cross_entropy(model.forward_segment(d[None], None).logits[0, :-1].float(), d[1:],
                                     reduction="none") for d in docs]
    pooled, doc_mean = float(torch.cat(per_token).mean()), float(torch.stack([c.mean() for c in per_token]).mean())
    assert abs(pooled - doc_mean) > 1e-3                     # the example separates the two reductions
    cfg = replace(REFINE, ntp_loss_agg_mode=agg, ppo_micro_batch_size_per_gpu=2)
    step = LocalRefineStep(model, torch.optim.SGD(model.parameters(), lr=0.0), cfg)
    got = step.step(docs, mode="ntp")["ntp_loss"]
    assert got == pytest.approx(pooled if agg == "token-mean" else doc_mean, abs=2e-6)


def test_local_step_mini_batches_are_separate_steps():
    """Issue 24 point 3 in the single-process step (test-time training): refine.ppo_mini_batch_size=2
    over 4 documents is two optimizer steps, the same as stepping on each pair in turn."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(0, V, (n,), generator=g) for n in (30, 50, 40, 60)]
    models = [build_policy(ModelConfig(type="delta_net", seed=3), V).train() for _ in range(2)]
    mini = LocalRefineStep(models[0], torch.optim.AdamW(models[0].parameters(), lr=1e-2),
                           replace(REFINE, ppo_mini_batch_size=2))
    whole = LocalRefineStep(models[1], torch.optim.AdamW(models[1].parameters(), lr=1e-2), REFINE)
    assert mini.step(docs, mode="ntp")["optimizer_steps"] == 2
    assert [whole.step(pair, mode="ntp")["optimizer_steps"] for pair in (docs[:2], docs[2:])] == [1, 1]
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(a, b), name

"""Activation checkpointing (``model.gradient_checkpointing``, issue 23 point 1).

Per decoder block, non-reentrant (transformers' ``GradientCheckpointingLayer`` switch, as fla's
blocks): the learner's per-document loss (``refine.loss.document_loss``: NTP loss + PPO on the
continuations) and every parameter gradient are bitwise equal with and without it, for every
registry family, on the prefix-shared trunk (states at the cuts returned by the trunk, branches
from them) and on the re-encode path; the blocks really are re-run in backward and keep less for
backward; inference (no grad, eval mode) never checkpoints; transformers'
``gradient_checkpointing_enable`` works on exported checkpoints. The float32 recompute runs the
same ops on the same inputs, hence bitwise equality rather than a tolerance.
"""
import warnings
from dataclasses import replace

import pytest
import torch

from refine_ray.config import ModelConfig, RefineConfig, load_config
from refine_ray.models import registry
from refine_ray.models.base import enable_checkpointing
from refine_ray.refine.loss import document_loss
from refine_ray.refine.policy import build_policy

V = 97
REFINE = RefineConfig(n_chunks=4, response_length=5, samples_per_prefix=2, temperature=0.7)


def _document(L: int = 300):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (L,), generator=g)
    cuts = torch.tensor([30, 64, 129, 250])          # on / between the one-pass trunk's kept states
    n_rows = len(cuts) * REFINE.samples_per_prefix
    responses = torch.randint(0, V, (n_rows, REFINE.response_length), generator=g)
    old = -3.0 - torch.rand(n_rows, REFINE.response_length, generator=g)
    adv = torch.randn(n_rows, generator=g)
    return ids, cuts, responses, old, adv


def _switched_on(model) -> bool:
    """transformers' per-block flag is set (``is_gradient_checkpointing``, renamed in 5.25)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _loss_and_grads(model, cfg: RefineConfig):
    ids, cuts, responses, old, adv = _document()
    model.zero_grad(set_to_none=True)
    loss, _ = document_loss(model, ids, cuts, responses, old, adv, cfg)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("shared", [True, False], ids=["prefix_shared", "reencode"])
@pytest.mark.parametrize("model_type", registry.MODEL_TYPES)
def test_loss_and_every_gradient_equal_with_checkpointing(model_type, shared):
    cfg = replace(REFINE, prefix_sharing=shared)
    plain = build_policy(ModelConfig(type=model_type, seed=1), V, "cpu").train()
    ckpt = build_policy(ModelConfig(type=model_type, seed=1, gradient_checkpointing=True), V, "cpu").train()
    assert _switched_on(ckpt) and not _switched_on(plain)
    loss_a, grads_a = _loss_and_grads(plain, cfg)
    loss_b, grads_b = _loss_and_grads(ckpt, cfg)
    assert torch.equal(loss_a, loss_b)
    assert all(g is not None for g in grads_a.values()), "every parameter takes a gradient"
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), name


def _block_calls(model):
    """``({"checkpointed": calls of the checkpoint function, "block": block forwards}, blocks)``,
    counted from now on."""
    counts = {"checkpointed": 0, "block": 0}
    for module in model.modules():
        if hasattr(module, "_gradient_checkpointing_func"):          # the blocks enable_checkpointing marked
            func = module._gradient_checkpointing_func

            def counted(*args, _func=func, **kwargs):
                counts["checkpointed"] += 1
                return _func(*args, **kwargs)
            module._gradient_checkpointing_func = counted
    # each block's first module (the mixer's pre-norm), counted on entry: torch's early stop may
    # end a recompute before a later module's forward returns
    norms = [m for name, m in model.named_modules() if name.endswith((".attn_norm", ".input_layernorm"))]
    for m in norms:
        m.register_forward_pre_hook(lambda *_: counts.__setitem__("block", counts["block"] + 1))
    return counts, len(norms)


def _saved_bytes(fn):
    """(bytes autograd keeps for backward outside checkpointed regions while ``fn()`` runs, its result)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


@pytest.mark.parametrize("model_type", registry.MODEL_TYPES)
def test_checkpointing_reruns_blocks_in_backward_and_keeps_less(model_type):
    ids = torch.randint(0, V, (1, 256), generator=torch.Generator().manual_seed(0))
    plain = registry.build_model(model_type, seed=2, vocab_size=V).train()
    kept_plain, _ = _saved_bytes(lambda: plain.forward_segment(ids, return_logits=False).hidden.sum())
    model = registry.build_model(model_type, seed=2, vocab_size=V).train()
    enable_checkpointing(model)
    counts, n_layers = _block_calls(model)
    kept, loss = _saved_bytes(lambda: model.forward_segment(ids, return_logits=False).hidden.sum())
    assert counts == {"checkpointed": n_layers, "block": n_layers}
    loss.backward()
    assert counts == {"checkpointed": n_layers, "block": 2 * n_layers}       # each block re-ran once
    assert kept < kept_plain / 3, (kept, kept_plain)
    # inference pays nothing: no checkpoint under no_grad, nor in eval mode
    with torch.no_grad():
        model.forward_segment(ids)
    model.eval()
    model.forward_segment(ids).logits.sum().backward()
    assert counts == {"checkpointed": n_layers, "block": 4 * n_layers}


@pytest.mark.parametrize("model_type", registry.MODEL_TYPES)
def test_transformers_switch_on_an_exported_checkpoint(model_type, tmp_path):
    """``supports_gradient_checkpointing`` is True and HF's own switch and forward (labels) work
    on what ``save_pretrained`` wrote: same loss and gradients, blocks checkpointed."""
    registry.build_model(model_type, seed=3, vocab_size=V).save_pretrained(tmp_path)
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    results = []
    for enable in (False, True):
        model = registry.load_model(str(tmp_path)).train()
        if enable:
            with warnings.catch_warnings():      # transformers >= 5.25 names it activation_checkpointing_enable
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
            assert _switched_on(model)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (la, ga), (lb, gb) = results
    assert torch.equal(la, lb)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))


def test_paper_presets_checkpoint_and_tiny_ones_do_not():
    from pathlib import Path

    from refine_ray.config import ExperimentConfig, from_dict, read_config_file

    configs = Path(__file__).resolve().parents[2] / "configs"
    assert ModelConfig().gradient_checkpointing is False
    for path in sorted(configs.glob("paper_*.yaml")):     # not validated: they name unshipped checkpoints
        assert from_dict(ExperimentConfig, read_config_file(path), "").model.gradient_checkpointing, path.name
    for path in sorted(configs.glob("tiny_*.yaml")):
        assert not load_config(path).model.gradient_checkpointing, path.name

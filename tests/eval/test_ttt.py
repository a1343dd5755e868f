"""Local REFINE step and test-time training: weights move, and reset restores weights + Adam state."""
import pyarrow.parquet as pq
import pytest
import torch

from refine_ray.config import ExperimentConfig, OptimConfig, RefineConfig
from refine_ray.refine.local_step import LocalRefineStep
from refine_ray.models import registry
from refine_ray.eval.ttt import TestTimeTrainer, TTTConfig

REFINE = dict(n_chunks=2, response_length=3, samples_per_prefix=2, min_prefix=8)


@pytest.fixture(scope="module")
def prompts(shared_data, tokenizer):
    rows = pq.read_table(shared_data / "longbench" / "trec_16384.parquet").slice(0, 2).to_pylist()
    return [torch.tensor(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"][-96:]) for r in rows]


def _exp(**refine) -> ExperimentConfig:
    return ExperimentConfig(refine=RefineConfig(**{**REFINE, **refine}), optim=OptimConfig(lr=1e-2))


def _model(tokenizer, kind="delta_net"):
    return registry.build_model(kind, seed=0, vocab_size=len(tokenizer))


def _assert_same(a, b):
    (wa, oa), (wb, ob) = a, b
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert oa["state"].keys() == ob["state"].keys()
    for p in oa["state"]:
        assert oa["state"][p].keys() == ob["state"][p].keys()
        for name, t in oa["state"][p].items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(ob["state"][p][name])), (p, name)
    assert oa["param_groups"] == ob["param_groups"]


def _differs(a, b) -> bool:
    return any(not torch.equal(a[0][k], b[0][k]) for k in a[0])


@pytest.mark.parametrize("kind,shared", [("delta_net", True), ("lact", False)])
def test_local_step_moves_weights_with_finite_metrics(tokenizer, prompts, kind, shared):
    model = _model(tokenizer, kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = LocalRefineStep(model, opt, RefineConfig(**REFINE, reward="hybrid", prefix_sharing=shared), tokenizer=tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = step.step(prompts)
    assert m["refine_docs"] == 2 and m["ntp_only_docs"] == 0 and m["stepped"] == 1
    for name in ("loss", "ntp_loss", "pg_loss", "grad_norm", "train_cuts/reward_mean", "train_cuts/cosine_mean", "train_cuts/exact_mean"):
        assert torch.isfinite(torch.tensor(m[name])), name
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_local_step_ntp_mode_and_short_documents(tokenizer, prompts):
    model = _model(tokenizer)
    step = LocalRefineStep(model, torch.optim.AdamW(model.parameters(), lr=1e-2), RefineConfig(**REFINE))
    m = step.step(prompts, mode="ntp")
    assert m["refine_docs"] == 0 and m["ntp_only_docs"] == 2 and "pg_loss" not in m
    m = step.step([prompts[0][:12], prompts[1], prompts[0][:1]])   # too short for 2 cuts of 3; no NTP target
    assert (m["refine_docs"], m["ntp_only_docs"], m["skipped_docs"]) == (1, 1, 1)
    assert torch.isfinite(torch.tensor(m["loss"]))


def _run(model, tokenizer, prompts, ttt):
    trainer = TestTimeTrainer(model, _exp(), ttt, tokenizer)
    trainer.updater.step(prompts, mode="ntp")        # give Adam a non-empty state to restore
    original = trainer.snapshot()
    seen = {}
    trainer.answer(prompts, [3, 3], hook=lambda event, b, t: seen.__setitem__((event, b), t.snapshot()))
    return trainer, original, seen


def test_ttt_restores_weights_and_optimizer_state_between_prompts(tokenizer, prompts):
    model = _model(tokenizer)
    trainer, original, seen = _run(model, tokenizer, prompts, TTTConfig(mode="refine", steps=2))
    _assert_same(seen[("start", 0)], original)
    assert _differs(seen[("adapted", 0)], original)                        # prompt 1 did adapt
    assert seen[("adapted", 0)][1]["state"][0]["step"] != original[1]["state"][0]["step"]
    _assert_same(seen[("start", 1)], original)                             # prompt 2 starts from the originals
    assert _differs(seen[("adapted", 1)], original)
    _assert_same(trainer.snapshot(), original)                             # and the end state is the original
    # Prompt 2 alone, from a fresh copy of the same start, adapts to exactly the same weights.
    fresh = _model(tokenizer)
    alone = TestTimeTrainer(fresh, _exp(), TTTConfig(mode="refine", steps=2), tokenizer)
    alone.restore(original)
    got = {}
    alone.answer(prompts[1:], [3], hook=lambda e, b, t: got.__setitem__(e, t.snapshot()))
    _assert_same(got["adapted"], seen[("adapted", 1)])


def test_ttt_accumulate_keeps_adapting(tokenizer, prompts):
    model = _model(tokenizer)
    trainer, original, seen = _run(model, tokenizer, prompts, TTTConfig(mode="ntp", accumulate=True))
    _assert_same(seen[("start", 1)], seen[("adapted", 0)])
    assert _differs(trainer.snapshot(), original)


def test_ttt_short_prompt_falls_back_to_ntp(tokenizer, prompts):
    model = _model(tokenizer)
    trainer = TestTimeTrainer(model, _exp(), TTTConfig(mode="refine"), tokenizer)
    out = trainer.answer([prompts[0][:12], prompts[1]], [2, 2])
    assert [len(o) for o in out] == [2, 2]
    s = trainer.summary()
    assert s["ttt/ntp_fallback_prompts"] == 1 and s["ttt/batches"] == 2

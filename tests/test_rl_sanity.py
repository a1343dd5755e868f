"""RL sanity harness (issue 15 point 4, issue 24 point 5): scripts/rl_sanity.py.

Fast: the fixed-cuts mode holds the training cuts and draws fresh samples, and p(truth) is the
model's own probability of the true continuation. Slow: the harness's small case (2 gov_report
documents of 256 tokens, 60 warm-up NTP steps, 30 steps per variant; the bounds are the harness's,
set before its first run) and PG-only at fixed trained cuts (k=1, G=16) for two model families.
The outcomes and why are in docs/results.md."""
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from refine_ray.models import registry
from refine_ray.refine.local_step import LocalRefineStep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("rl_sanity", ROOT / "scripts" / "rl_sanity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module         # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_fixed_cuts_hold_the_cuts_and_resample(harness):
    """One command line gives the fixed-cut setup; two steps train the same cuts (those drawn by
    the fixed key, given to ``LocalRefineStep.collect``) with different samples; ``truth_logprobs`` is log softmax of the full forward
    pass at the position before each cut (k=1)."""
    setup, out = harness.parse_args(["--fixed-cuts", "--k", "1", "--samples", "16", "--model", "llama",
                                     "--variants", "pg_exact", "--out", "somewhere"])
    assert (setup.fixed_cuts, setup.k, setup.samples, setup.model, setup.variants, str(out)) == \
        (True, 1, 16, "llama", ["pg_exact"], "somewhere")
    assert harness.parse_args([])[0] == harness.Setup()
    setup = replace(setup, model="delta_net", docs=2, tokens=256)
    torch.set_num_threads(1)
    docs, vocab = harness.load_documents(setup)
    model = registry.build_model("delta_net", seed=0, vocab_size=vocab)
    cfg = harness.refine_config(setup, "pg_exact")
    step = LocalRefineStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), cfg, seed=3)
    expected = harness.cuts_keyed_by(model, docs, cfg, 3, harness.TRAIN_CUT_STEP)
    first = step.collect(docs, range(2), cuts=expected)     # what run_variant does with fixed cuts
    step.update(docs, first)
    step.step_index += 1
    second = step.collect(docs, range(2), cuts=expected)
    for a, b, c in zip(first.cuts, second.cuts, expected):
        assert a.tolist() == b.tolist() == c.tolist()
    assert first.responses.shape == second.responses.shape == (2 * cfg.n_chunks * 16, 1)
    assert not torch.equal(first.responses, second.responses)
    with torch.no_grad():
        lp = harness.truth_logprobs(model, docs, first.cuts, 1)
        full = torch.cat([model.forward_segment(ids[None], None).logits[0].log_softmax(-1)[c - 1, ids[c]]
                          for ids, c in zip(docs, first.cuts)])
    torch.testing.assert_close(lp[:, 0], full, atol=1e-5, rtol=1e-5)
    assert harness.truth_metrics(lp)["p_truth"] == pytest.approx(float(full.exp().mean()), abs=1e-6)


@pytest.fixture(scope="module")
def run(harness, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_sanity")
    setup = harness.Setup(docs=2, tokens=256, warmup=60, steps=30, eval_every=10,
                          variants=["pg_frozen_lowlr", "pg_policy", "mix_frozen", "ntp"])
    return harness.main(setup, out), out


@pytest.mark.slow
def test_harness_writes_json_table_and_plot(run):
    result, out = run
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == {"pg_frozen_lowlr", "pg_policy", "mix_frozen", "ntp"}
    assert [e["step"] for e in saved["results"]["ntp"]["eval"]] == [0, 10, 20, 30]
    for name in ("pg_frozen_lowlr", "pg_policy", "mix_frozen"):    # per step at its own (entropy) cuts
        assert {"before/p_truth", "after/p_truth", "sampled_match", "zero_adv_groups"} <= set(
            saved["results"][name]["train"][0])
    table = (out / "results.md").read_text()
    assert "| mix_frozen |" in table and "steps that raise p_truth at their cuts" in table
    assert (out / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_frozen_reward_cannot_be_raised_by_collapse(run):
    """The frozen reference never moves: its reward for fixed random tokens is the same number at
    every evaluation of every variant, while PG on the paper's policy reward lifts the policy
    cosine of those same random tokens (the reward being raised by collapse, not prediction)."""
    results = run[0]["results"]
    values = {e["nsp_cosine_frozen_random"] for hist in results.values() for e in hist["eval"]}
    assert len(values) == 1
    policy = results["pg_policy"]["eval"]
    assert max(e["nsp_cosine_policy_random"] for e in policy[1:]) > policy[0]["nsp_cosine_policy_random"]


@pytest.mark.slow
def test_paper_mix_learns_within_the_stated_margin_of_ntp(run):
    checks = run[0]["checks"]
    for name in ("mix_frozen NTP loss <= ntp + 0.3", "mix_frozen greedy exact >= ntp - 0.1"):
        assert checks[name]["pass"], (name, checks[name])


@pytest.mark.slow
def test_pg_only_keeps_collapse_indicators_within_bounds(run):
    checks = run[0]["checks"]
    for name in ("pg_frozen_lowlr hidden pair cosine rise <= 0.15", "pg_frozen_lowlr distinct tokens >= 0.5 x truth's",
                 "pg_frozen_lowlr NTP loss rise <= 1 nat"):
        assert checks[name]["pass"], (name, checks[name])


# PG-only at fixed trained cuts, this small case (8 cuts): p(truth) there rose by 0.67 / 0.63 / 0.70
# (delta_net) and 0.73 / 0.78 / 0.77 (llama) over seeds 0 / 1 / 2 (docs/results.md); it is computed,
# not sampled, so only the training run varies. 0.4 is well under the smallest rise and far above 0.
P_TRUTH_RISE = 0.4


@pytest.mark.slow
@pytest.mark.parametrize("model", ["delta_net", "llama"])
def test_pg_only_raises_p_truth_at_fixed_trained_cuts(harness, tmp_path, model):
    """PG alone (exact reward, no NTP) raises the model's probability of the true next token where
    it trains: k=1, G=16, the cuts held fixed, AdamW 1e-3."""
    setup = harness.Setup(model=model, docs=2, tokens=256, warmup=60, steps=60, eval_every=20, fixed_cuts=True,
                          k=1, samples=16, variants=["pg_exact"])
    hist = harness.main(setup, tmp_path)["results"]["pg_exact"]
    ev = hist["eval"]
    assert ev[-1]["trained_p_truth"] >= ev[0]["trained_p_truth"] + P_TRUTH_RISE, [e["trained_p_truth"] for e in ev]

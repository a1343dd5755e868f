"""Fixed-cut next-sequence evaluation (issue 15 point 2) and the frozen-reference reward (point 3).

Checked against independent computations: greedy exact match against ``generate`` from every
prefix, the frozen reference's hidden states against re-encoding ``prefix + continuation``,
and the frozen reward against a policy whose hidden states are made to collapse.
"""
import copy

import pytest
import torch

from refine_ray.algo import cosine_reward, sample_cuts
from refine_ray.config import RefineConfig
from refine_ray.models import registry
from refine_ray.models.generation import generate
from refine_ray.refine.frozen_reference import reference_hidden
from refine_ray.refine.heldout import EVAL_STEP, evaluate_fixed_cuts
from refine_ray.refine.local_step import LocalRefineStep
from refine_ray.refine.seeding import cut_seed

K, G, CUTS = 4, 3, 5
CFG = RefineConfig(n_chunks=2, response_length=K, samples_per_prefix=G, min_prefix=12)


@pytest.fixture(scope="module")
def setup():
    """A tiny DeltaNet briefly trained on 3 repetitive documents (so greedy continuations sometimes
    match), its frozen initial copy and the documents."""
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(40, (20,), generator=gen).repeat(5)[:90 + 7 * i] for i in range(3)]
    model = registry.build_model("delta_net", seed=0, vocab_size=64)
    initial = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(4):
        loss = sum(torch.nn.functional.cross_entropy(model.forward_segment(d[None]).logits[0, :-1], d[1:])
                   for d in docs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), initial, docs


def test_metrics_are_fixed_and_greedy_match_equals_generate(setup):
    model, initial, docs = setup
    out = evaluate_fixed_cuts(model, docs, CFG, seed=5, num_cuts=CUTS, reference=initial)
    assert out == evaluate_fixed_cuts(model, docs, CFG, seed=5, num_cuts=CUTS, reference=initial)
    assert out["val/nsp_docs"] == 3.0
    tokens, seqs = [], []
    for d, ids in enumerate(docs):   # the cut rule, independently: uniform, keyed by (seed, EVAL_STEP, d)
        cuts = sample_cuts(torch.zeros(ids.numel()), CUTS, K, "uniform", CFG.min_prefix,
                           generator=torch.Generator().manual_seed(cut_seed(5, EVAL_STEP, d)))
        for c in cuts.tolist():
            match = (generate(model, ids[:c], K) == ids[c:c + K]).float()
            tokens.append(float(match.mean()))
            seqs.append(float(match.min()))
    assert out["val/nsp_exact_greedy"] == pytest.approx(sum(tokens) / len(tokens), abs=1e-9)
    assert out["val/nsp_exact_greedy_seq"] == pytest.approx(sum(seqs) / len(seqs), abs=1e-9)
    assert 0 < out["val/nsp_exact_greedy"] < 1      # the trained model predicts some, not all
    expected = {"val/" + k for k in ("ntp_loss", "nsp_exact", "nsp_cosine_policy", "nsp_cosine_policy_random",
                                     "nsp_cosine_frozen", "nsp_cosine_frozen_random", "hidden_pair_cosine",
                                     "cut_entropy", "distinct_token_frac", "truth_distinct_token_frac")}
    assert expected <= set(out)


def test_frozen_side_equals_policy_side_when_the_reference_is_the_policy(setup):
    model, _, docs = setup
    out = evaluate_fixed_cuts(model, docs, CFG, seed=1, num_cuts=CUTS, reference=copy.deepcopy(model))
    assert out["val/nsp_cosine_frozen"] == pytest.approx(out["val/nsp_cosine_policy"], abs=1e-5)
    assert out["val/nsp_cosine_frozen_random"] == pytest.approx(out["val/nsp_cosine_policy_random"], abs=1e-5)


def test_reference_hidden_equals_reencoding_each_prefix(setup):
    _, initial, docs = setup
    ids, cuts = docs[1], torch.tensor([15, 40, 77])
    responses = torch.randint(64, (3 * G, K), generator=torch.Generator().manual_seed(2))
    resp_h, true_h = reference_hidden(initial, ids, cuts, responses, G)
    with torch.no_grad():
        full = initial.forward_segment(ids[None], None, return_logits=False).hidden[0]
        for j, c in enumerate(cuts.tolist()):
            assert torch.allclose(true_h[j], full[c:c + K], atol=1e-5)
            for g in range(G):
                seq = torch.cat([ids[:c], responses[j * G + g]])[None]
                direct = initial.forward_segment(seq, None, return_logits=False).hidden[0, c:]
                assert torch.allclose(resp_h[j * G + g], direct, atol=1e-5)


def test_collapse_raises_the_policy_reward_but_not_the_frozen_one(setup):
    """Make every policy hidden state point one way (a hook on the final norm): the paper's reward of
    RANDOM tokens goes to ~1 and the unrelated-position cosine to ~1; the frozen reward of the same
    random tokens does not move."""
    model, initial, docs = setup
    collapsed = copy.deepcopy(model)
    direction = torch.randn(collapsed.config.hidden_size, generator=torch.Generator().manual_seed(0))
    collapsed.get_submodule("model.norm").register_forward_hook(lambda mod, inp, out: out + 1e3 * direction)
    before = evaluate_fixed_cuts(model, docs, CFG, seed=2, num_cuts=CUTS, reference=initial)
    after = evaluate_fixed_cuts(collapsed, docs, CFG, seed=2, num_cuts=CUTS, reference=initial)
    assert before["val/nsp_cosine_policy_random"] < 0.9 and before["val/hidden_pair_cosine"] < 0.9
    assert after["val/nsp_cosine_policy_random"] > 0.999 and after["val/hidden_pair_cosine"] > 0.999
    assert after["val/nsp_cosine_frozen_random"] == before["val/nsp_cosine_frozen_random"]
    assert after["val/distinct_token_frac"] < before["val/distinct_token_frac"]   # one direction, one token


def test_local_step_frozen_reward_reads_the_initial_weights(setup):
    _, initial, docs = setup
    model = copy.deepcopy(initial).train()
    cfg = RefineConfig(n_chunks=2, response_length=K, samples_per_prefix=G, min_prefix=12, reward_source="frozen")
    step = LocalRefineStep(model, torch.optim.AdamW(model.parameters(), lr=1e-2), cfg, seed=3)
    for _ in range(2):
        metrics = step.step(docs)
    for p, q in zip(step.reference.parameters(), initial.parameters()):    # the copy stayed frozen
        assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters()))
    exp = step.collect(docs, [0, 1, 2])
    rows = [reference_hidden(initial, docs[i], exp.cuts[i], exp.responses[i * 2 * G:(i + 1) * 2 * G], G)
            for i in range(3)]
    want = cosine_reward(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]).repeat_interleave(G, 0))
    assert exp.metrics["train_cuts/reward_mean"] == pytest.approx(float(want.mean()), abs=1e-6)
    assert 0 < metrics["collapse/distinct_token_frac"] <= 1 and metrics["cut_entropy"] > 0
    assert -1 <= metrics["collapse/hidden_pair_cosine"] <= 1

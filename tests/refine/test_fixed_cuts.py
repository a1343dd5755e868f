"""``LocalRefineStep.collect(cuts=...)``: a step that trains at cuts the caller holds fixed (what
scripts/rl_sanity.py's fixed-cut mode uses) samples, rewards and trains exactly there."""
import pytest
import torch

from refine_ray.algo import exact_match_reward, grpo_advantages, make_group_ids
from refine_ray.config import RefineConfig
from refine_ray.models import registry
from refine_ray.refine.local_step import LocalRefineStep
from refine_ray.refine.loss import document_loss
from refine_ray.refine.sequence_logprobs import document_logprobs


def test_collect_at_given_cuts_trains_exactly_there():
    torch.manual_seed(0)
    model = registry.build_model("delta_net", seed=0, vocab_size=83)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 83, (120,), generator=gen), torch.randint(0, 83, (150,), generator=gen)]
    cfg = RefineConfig(n_chunks=3, response_length=2, samples_per_prefix=4, reward="exact", ntp_coef=0.0,
                       pg_coef=1.0, min_prefix=2)
    step = LocalRefineStep(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, seed=1)
    given = [torch.tensor([10, 57, 100]), torch.tensor([140, 3, 77])]
    drawn = step.collect(docs, [0, 1])
    assert any(d.tolist() != g.tolist() for d, g in zip(drawn.cuts, given))   # the option changes the cuts
    exp = step.collect(docs, [0, 1], cuts=given)
    assert [c.tolist() for c in exp.cuts] == [g.tolist() for g in given]
    G, rows = 4, 3 * 4
    truth = torch.cat([torch.stack([ids[c:c + 2] for c in g.tolist()]) for ids, g in zip(docs, given)])
    rewards = exact_match_reward(exp.responses, truth.repeat_interleave(G, 0))
    torch.testing.assert_close(exp.advantages, grpo_advantages(rewards, make_group_ids(2, 3, G)), atol=0, rtol=0)
    losses = []
    for d, (ids, g) in enumerate(zip(docs, given)):
        part = slice(d * rows, (d + 1) * rows)
        with torch.no_grad():     # the samples were drawn from the states at the given cuts
            lp = document_logprobs(model, ids, g, exp.responses[part], G, cfg.temperature, with_ntp=False).logprobs
        torch.testing.assert_close(exp.old_logprobs[part], lp, atol=1e-5, rtol=1e-5)
        losses.append(document_loss(model, ids, g, exp.responses[part], exp.old_logprobs[part],
                                    exp.advantages[part], cfg)[1]["pg_loss"])
    assert step.update(docs, exp)["pg_loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        step.collect(docs, [0], cuts=[torch.tensor([10, 57, 119])])

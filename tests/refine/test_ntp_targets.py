"""NTP loss on chosen target tokens only (``ntp_targets``), e.g. the answers of a recall task.

The chunked head loss, the per-document loss (shared trunk and re-encode) and the
single-process step count exactly the marked targets: equal to a plain cross-entropy over
those positions, and gradients reach the model only through them.
"""
import torch
import torch.nn.functional as F

from refine_ray.algo import ntp_loss_from_hidden
from refine_ray.config import RefineConfig
from refine_ray.models import registry
from refine_ray.refine.local_step import LocalRefineStep
from refine_ray.refine.loss import document_loss
from refine_ray.refine.sequence_logprobs import document_ntp_loss

V, L = 53, 40
CFG = RefineConfig(n_chunks=2, response_length=3, samples_per_prefix=2, min_prefix=8, ntp_coef=1.0, pg_coef=0.2)


def _model():
    return registry.build_model("delta_net", seed=0, vocab_size=V)


def _doc_and_targets():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(V, (L,), generator=gen)
    targets = torch.zeros(L, dtype=torch.bool)
    targets[25:] = True          # the "answers": the last 15 tokens
    targets[30] = False
    return ids, targets


def _plain_ce(model, ids, targets):
    logits = model.forward_segment(ids[None], None, return_logits=True).logits[0].float()
    picked = targets[1:]
    return F.cross_entropy(logits[:-1][picked], ids[1:][picked])


def test_head_loss_counts_only_the_targets():
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 12, 8, generator=gen), torch.randn(V, 8, generator=gen)
    ids = torch.randint(V, (2, 12), generator=gen)
    targets = torch.rand(2, 12, generator=gen) > 0.5
    expected = F.cross_entropy((hidden[:, :-1] @ weight.T)[targets[:, 1:]], ids[:, 1:][targets[:, 1:]])
    got = ntp_loss_from_hidden(hidden, weight, ids, targets=targets, chunk_size=3)
    assert torch.allclose(got, expected, atol=1e-6)
    everything = ntp_loss_from_hidden(hidden, weight, ids)
    assert torch.allclose(ntp_loss_from_hidden(hidden, weight, ids, targets=torch.ones_like(targets)), everything)
    assert float(ntp_loss_from_hidden(hidden, weight, ids, targets=torch.zeros_like(targets))) == 0.0


def test_document_ntp_loss_counts_only_the_targets():
    model, (ids, targets) = _model(), _doc_and_targets()
    loss = document_ntp_loss(model, ids, targets=targets)
    assert torch.allclose(loss, _plain_ce(model, ids, targets), atol=1e-5)
    changed = ids.clone()
    changed[30] = (ids[30] + 1) % V          # not a target: only its role as context changes
    assert not torch.allclose(document_ntp_loss(model, ids), document_ntp_loss(model, changed))
    assert torch.allclose(document_ntp_loss(model, changed, targets=targets), _plain_ce(model, changed, targets),
                          atol=1e-5)


def test_document_loss_shared_and_reencode_agree_with_targets():
    ids, targets = _doc_and_targets()
    cuts = torch.tensor([12, 27])
    gen = torch.Generator().manual_seed(2)
    responses = torch.randint(V, (4, 3), generator=gen)
    old = -torch.rand(4, 3, generator=gen)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    results = []
    for shared in (True, False):
        model = _model()
        cfg = RefineConfig(**{**CFG.__dict__, "prefix_sharing": shared})
        loss, metrics = document_loss(model, ids, cuts, responses, old, adv, cfg, ntp_targets=targets)
        results.append(metrics)
        assert abs(metrics["ntp_loss"] - float(_plain_ce(_model(), ids, targets))) < 1e-5
    assert abs(results[0]["loss"] - results[1]["loss"]) < 1e-5
    full = document_loss(_model(), ids, cuts, responses, old, adv, CFG)[1]
    assert abs(full["ntp_loss"] - results[0]["ntp_loss"]) > 1e-3      # the mask changed the NTP term


def test_local_step_uses_the_targets_and_checks_their_shape():
    ids, targets = _doc_and_targets()
    model = _model()
    step = LocalRefineStep(model, torch.optim.SGD(model.parameters(), lr=0.0), CFG, seed=0)
    expected = float(_plain_ce(model, ids, targets))
    for mode in ("ntp", "refine"):
        metrics = step.step([ids], mode=mode, ntp_targets=[targets])
        assert abs(metrics["ntp_loss"] - expected) < 1e-5, mode
    try:
        step.step([ids], ntp_targets=[targets[:-1]])
    except ValueError as err:
        assert "ntp_targets" in str(err)
    else:
        raise AssertionError("a mask of the wrong length was accepted")

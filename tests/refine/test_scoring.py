"""score_document's cut states equal the state of prefilling each prefix on its own.

Both ways of keeping states are covered: the in-pass checkpoints + one batched catch-up of
the DeltaNet family, and the segmented pass + per-cut catch-up of LaCT and attention models.
"""
import pytest
import torch

from refine_ray.config import RefineConfig
from refine_ray.models import registry
from refine_ray.models.generation import prefill
from refine_ray.refine.cut_states import pass_keeping_states, resolve_state_stride, states_at_cuts
from refine_ray.refine.scoring import score_document

TOL = 1e-5


def _close(a, b):
    for la, lb in zip(a.layers, b.layers):
        assert la.keys() == lb.keys()
        for key in la:
            torch.testing.assert_close(la[key].float(), lb[key].float(), atol=TOL, rtol=0, msg=key)


@pytest.mark.parametrize("model_type,stride", [("delta_net", 0), ("delta_net", 128), ("delta_net", 40),
                                               ("gated_deltanet", 0), ("lact", 0), ("lact", 100),
                                               ("llama", 0)])
def test_cut_states_equal_prefill(model_type, stride):
    model = registry.build_model(model_type, seed=0, vocab_size=83).eval()
    ids = torch.randint(0, 83, (700,), generator=torch.Generator().manual_seed(3))
    cfg = RefineConfig(n_chunks=12, response_length=3, min_prefix=2)
    gen = torch.Generator().manual_seed(0)
    score = score_document(model, ids, cfg, gen, with_states=True, state_stride=stride)
    plain = score_document(model, ids, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(score.cuts, plain.cuts) and plain.cut_states is None
    torch.testing.assert_close(score.gt_hidden, plain.gt_hidden, atol=1e-4, rtol=0)
    assert len(score.cut_states) == cfg.n_chunks
    for c, st in zip(score.cuts.tolist(), score.cut_states):
        ref, hidden = prefill(model, [ids[:c]])
        assert st.offset == c
        _close(st, ref)
        torch.testing.assert_close(score.cut_hidden[score.cuts.tolist().index(c)], hidden[0].float(),
                                   atol=1e-4, rtol=0)


def test_batched_catch_up_at_and_before_kept_states():
    """Cuts on a kept state (no catch-up), before the first one (from the empty state),
    between them, and repeated, in one call."""
    model = registry.build_model("gated_deltanet", seed=1, vocab_size=83).eval()
    ids = torch.randint(0, 83, (300,), generator=torch.Generator().manual_seed(4))
    stride = resolve_state_stride(model)
    assert stride == 64
    cuts = torch.tensor([1, 63, 64, 65, 128, 250, 250, 256])
    with torch.no_grad():
        _, kept = pass_keeping_states(model, ids, stride)
        states = states_at_cuts(model, ids, cuts, kept, stride)
    for c, st in zip(cuts.tolist(), states):
        assert st.offset == c
        _close(st, prefill(model, [ids[:c]])[0])


@pytest.mark.parametrize("stride", [0, 128])
def test_cut_states_of_a_document_shorter_than_the_stride(stride):
    """No kept state at all (L < stride): every cut catches up from the empty state."""
    model = registry.build_model("delta_net", seed=2, vocab_size=83).eval()
    cfg = RefineConfig(n_chunks=4, response_length=3, min_prefix=1)
    ids = torch.randint(0, 83, (60,), generator=torch.Generator().manual_seed(7))
    score = score_document(model, ids, cfg, torch.Generator().manual_seed(1), with_states=True, state_stride=stride)
    for c, st in zip(score.cuts.tolist(), score.cut_states):
        _close(st, prefill(model, [ids[:c]])[0])


@pytest.mark.parametrize("model_type", ["delta_net", "lact"])
def test_cut_states_go_to_host_memory_once_scored(model_type):
    """By default the cut states come back in host memory ('cpu'), bitwise what the model's device
    held (``states_device=None``); the copy is made to the device named, here the meta device (on
    CPU the only other device: the states a model on an accelerator computes are copied the same
    way), so a scorer holds at most one document's cut states on its accelerator."""
    model = registry.build_model(model_type, seed=0, vocab_size=83).eval()
    ids = torch.randint(0, 83, (300,), generator=torch.Generator().manual_seed(3))
    cfg = RefineConfig(n_chunks=4, response_length=3, min_prefix=2)
    host, kept, moved = (score_document(model, ids, cfg, torch.Generator().manual_seed(0), with_states=True, **kw)
                         for kw in ({}, {"states_device": None}, {"states_device": "meta"}))
    for a, b, m in zip(host.cut_states, kept.cut_states, moved.cut_states):
        assert a.offset == b.offset == m.offset
        for la, lb, lm in zip(a.layers, b.layers, m.layers):
            for key in la:
                assert la[key].device.type == "cpu" and torch.equal(la[key], lb[key])
                assert lm[key].device.type == "meta" and (lm[key].shape, lm[key].dtype) == (la[key].shape,
                                                                                             la[key].dtype)
    assert moved.cuts.device.type == moved.gt_hidden.device.type == "cpu"      # the rest stays on the model's


def test_given_cuts_are_used_as_they_are():
    """``cuts=``: no draw; the ground truth and states are those at the cuts given; a wrong count or a
    cut without k tokens after it is one ValueError."""
    model = registry.build_model("delta_net", seed=0, vocab_size=83).eval()
    ids = torch.randint(0, 83, (200,), generator=torch.Generator().manual_seed(5))
    cfg = RefineConfig(n_chunks=3, response_length=4, min_prefix=2)
    cuts = torch.tensor([7, 150, 33])
    score = score_document(model, ids, cfg, with_states=True, cuts=cuts)
    assert score.cuts.tolist() == [7, 150, 33]
    assert torch.equal(score.gt_ids, torch.stack([ids[c:c + 4] for c in (7, 150, 33)]))
    for c, st in zip((7, 150, 33), score.cut_states):
        _close(st, prefill(model, [ids[:c]])[0])
    with pytest.raises(ValueError, match="cuts: 2 given, refine.n_chunks=3 expected"):
        score_document(model, ids, cfg, cuts=torch.tensor([7, 9]))
    with pytest.raises(ValueError, match="out of range"):
        score_document(model, ids, cfg, cuts=torch.tensor([7, 9, 197]))

"""States inside one pass, for prefix sharing: ``keep_states_at`` and ``lengths``.

Every kept / length-limited state must equal the state of running exactly that prefix on
its own (fp32, tiny shapes: measured ~1e-6; tolerance 1e-5), on our chunk-loop path and on
the slicing path that fla's kernels use; gradients through kept states equal those through
the separately computed prefix states.
"""
import pytest
import torch

from refine_ray.models import registry
from refine_ray.models.ops import dispatch as K

TOL = 1e-5


def _qkvb(B=2, T=200, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    beta = torch.rand(B, T, H, generator=g)
    decay = -torch.rand(B, T, H, generator=g) * 0.5
    h0 = torch.randn(B, H, D, D, generator=g) * 0.1
    return q, k, v, beta, decay, h0


POSITIONS = [1, 5, 63, 64, 65, 128, 150, 150, 199, 200]   # chunk edges, repeats, unsorted below


def _run(gated, q, k, v, beta, g, h0, t=None, **kw):
    sl = slice(0, t)
    if gated:
        return K.gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], h0, **kw)
    return K.delta_rule(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], h0, **kw)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("sliced", [False, True])
def test_op_kept_states_equal_prefix_states(gated, sliced):
    q, k, v, beta, g, h0 = _qkvb()
    pos = torch.tensor(POSITIONS[::-1])
    if sliced:   # the fla backend's way, here on our kernels
        o, final, kept = K._by_slices(
            lambda sl, s0: _run(gated, q[:, sl], k[:, sl], v[:, sl], beta[:, sl], g[:, sl], s0),
            q.shape[1], pos, h0)
    else:
        o, final, kept = _run(gated, q, k, v, beta, g, h0, keep_states_at=pos)
    o_ref, final_ref, none = _run(gated, q, k, v, beta, g, h0)
    assert none is None
    assert kept.shape == (2, len(pos), 2, 8, 8)
    torch.testing.assert_close(o, o_ref, atol=TOL, rtol=0)
    torch.testing.assert_close(final, final_ref, atol=TOL, rtol=0)
    for i, p in enumerate(pos.tolist()):
        torch.testing.assert_close(kept[:, i], _run(gated, q, k, v, beta, g, h0, p)[1], atol=TOL, rtol=0)


@pytest.mark.parametrize("gated", [False, True])
def test_op_kept_state_gradients_equal_prefix_gradients(gated):
    q, k, v, beta, g, h0 = _qkvb(T=150)
    pos = [40, 64, 130]
    weights = torch.randn(len(pos), 2, 8, 8, generator=torch.Generator().manual_seed(9))

    def grads(direct):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v, beta, g, h0)]
        if direct:
            _, _, kept = _run(gated, *inputs, keep_states_at=torch.tensor(pos))
            states = kept.unbind(1)
        else:
            states = [_run(gated, *inputs, t=p)[1] for p in pos]
        sum((s * w).sum() for s, w in zip(states, weights)).backward()
        return [t.grad for t in inputs]

    for a, b in zip(grads(True), grads(False)):
        if b is None:     # g without gating
            continue
        torch.testing.assert_close(a, b, atol=TOL * float(b.abs().max()), rtol=1e-4)


def test_op_kept_states_edge_cases():
    q, k, v, beta, _, h0 = _qkvb(T=40)
    _, _, kept = K.delta_rule(q, k, v, beta, h0, keep_states_at=torch.tensor([], dtype=torch.long))
    assert kept.shape[1] == 0
    for bad in ([0], [41]):
        with pytest.raises(ValueError, match="keep_states_at must lie in"):
            K.delta_rule(q, k, v, beta, h0, keep_states_at=torch.tensor(bad))


KINDS = {
    "delta_net": {},
    "delta_net_noconv": {"use_short_conv": False},
    "gated_deltanet": {},
    "gated_deltanet_gva": {"num_v_heads": 4, "head_dim": 16},
}


def _model(kind):
    model_type = kind if kind in ("delta_net", "gated_deltanet") else kind.rsplit("_", 1)[0]
    return registry.build_model(model_type, seed=0, vocab_size=61, **KINDS[kind]).eval()


def _assert_states_close(a, b):
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert la.keys() == lb.keys()
        for key in la:
            torch.testing.assert_close(la[key].float(), lb[key].float(), atol=TOL, rtol=0, msg=key)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_model_kept_states_and_lengths_equal_prefix_states(kind):
    model = _model(kind)
    ids = torch.randint(0, 61, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        start = model.forward_segment(ids[:, :37], None).state          # a non-empty initial state
        seg = ids[:, 37:]
        positions = [64, 3, 200, 64, 263]
        out = model.forward_segment(seg, start, return_logits=True, keep_states_at=positions)
        plain = model.forward_segment(seg, start, return_logits=True)
        torch.testing.assert_close(out.logits, plain.logits, atol=1e-4, rtol=0)
        _assert_states_close(out.state, plain.state)
        assert plain.kept_states is None and out.kept_states.batch_size == len(positions)
        for i, p in enumerate(positions):
            _assert_states_close(out.kept_states.index([i]), model.forward_segment(seg[:, :p], start).state)

        # lengths: three rows of one right-padded batch, each stopping at its own length
        lengths = torch.tensor([5, 63, 64 + 17])
        batch = torch.stack([seg[0, :90], seg[0, 100:190], seg[0, 50:140]])
        batch[0, 5:] = 0                                                     # pad content must not matter
        out = model.forward_segment(batch, start.repeat_interleave(3), lengths=lengths)
        for r, n in enumerate(lengths.tolist()):
            ref = model.forward_segment(batch[r:r + 1, :n], start)
            _assert_states_close(out.state.index([r]), ref.state)
            torch.testing.assert_close(out.hidden[r, :n], ref.hidden[0], atol=1e-4, rtol=0)


def test_model_rejects_bad_lengths_and_positions():
    model = _model("delta_net")
    ids = torch.zeros(2, 8, dtype=torch.long)
    for bad in ([0, 3], [3, 9], [3]):
        with pytest.raises(ValueError, match="lengths must be"):
            model.forward_segment(ids, lengths=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"keep_states_at must lie in \[1, 8\]"):
        model.forward_segment(ids, keep_states_at=[9])

"""LaCTForCausalLM: segment carry, cached decoding, padding, loss, save/load."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from refine_ray.models.base import ModelState
from refine_ray.models.lact import LaCTConfig, LaCTForCausalLM, tiny_lact_config

torch.set_num_threads(1)
ATOL = 2e-5  # fp32


def make_model(seed=0, **overrides):
    """Tiny model with a large base lr and init so the fast-weight branch matters in the logits."""
    torch.manual_seed(seed)
    kw = dict(base_lr=0.3, initializer_range=0.15)
    kw.update(overrides)
    return LaCTForCausalLM(tiny_lact_config(kw.pop("vocab_size", 256), **kw)).eval()


def ids_for(model, B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (B, T), generator=g)


def run_segments(model, ids, cuts):
    state, logits, hidden = None, [], []
    prev = 0
    for c in list(cuts) + [ids.shape[1]]:
        out = model.forward_segment(ids[:, prev:c], state)
        logits.append(out.logits)
        hidden.append(out.hidden)
        state, prev = out.state, c
    return torch.cat(logits, 1), torch.cat(hidden, 1), state


def test_fast_weights_matter_and_chunks_apply_then_update():
    model, frozen = make_model(), make_model(base_lr=1e-9)
    ids = ids_for(model, 2, 40)
    a, b = model(ids).logits, frozen(ids).logits
    C = model.config.lact_chunk_size
    torch.testing.assert_close(a[:, :C], b[:, :C], rtol=0, atol=1e-6)  # chunk 0 reads the initial W
    assert (a[:, C:] - b[:, C:]).abs().max() > 1e-2                    # later chunks read updated W


@pytest.mark.parametrize("cuts", [[16], [7, 16, 33], [1, 2, 3, 17, 31, 32, 50], [5, 21, 37, 48]])
def test_segments_equal_one_forward(cuts):
    model = make_model()
    ids = ids_for(model, 2, 53)
    full = model.forward_segment(ids)
    logits, hidden, state = run_segments(model, ids, cuts)
    torch.testing.assert_close(logits, full.logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(hidden, full.hidden, rtol=0, atol=ATOL)
    torch.testing.assert_close(model(ids).logits, full.logits, rtol=0, atol=ATOL)
    assert state.offset == 53
    for a, b in zip(state.layers, full.state.layers):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL)


def test_segment_gradients_equal_one_forward_and_flow_through_state():
    model = make_model()
    model.train()
    ids = ids_for(model, 2, 45)
    w = torch.randn(2, 45, model.config.vocab_size, generator=torch.Generator().manual_seed(3))

    def grads(cuts):
        model.zero_grad()
        logits = run_segments(model, ids, cuts)[0] if cuts else model.forward_segment(ids).logits
        (logits * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g_full, g_seg = grads(None), grads([9, 16, 30, 31])
    for n in g_full:
        scale = g_full[n].abs().max().clamp_min(1e-3)
        torch.testing.assert_close(g_seg[n] / scale, g_full[n] / scale, rtol=0, atol=ATOL, msg=n)
    # the fast-weight parameters get gradient through the carried state from later segments only
    model.zero_grad()
    first = model.forward_segment(ids[:, :20])
    later = model.forward_segment(ids[:, 20:], first.state)
    later.logits.sum().backward()
    assert model.model.layers[0].attn.lr_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_cached_decode_equals_full_recompute_every_step():
    model = make_model()
    C, W = model.config.lact_chunk_size, model.config.window_size
    T = 2 * C + W + 5  # crosses two chunk boundaries and runs beyond the window
    ids = ids_for(model, 2, T)
    with torch.no_grad():
        pre = model.forward_segment(ids[:, :5])   # prefill, then one token at a time
        state = pre.state
        for t in range(5, T):
            step = model.forward_segment(ids[:, t:t + 1], state)
            state = step.state
            ref = model(ids[:, :t + 1]).logits[:, -1]
            torch.testing.assert_close(step.logits[:, 0], ref, rtol=0, atol=ATOL, msg=f"step {t}")
        attn_k = state.layers[0]["attn_k"]
        assert attn_k.shape[2] == W - 1 and state.layers[0]["pk"].shape[2] == T % C
        full = model.forward_segment(ids).state
        for k in full.layers[1]:
            torch.testing.assert_close(state.layers[1][k], full.layers[1][k], rtol=0, atol=ATOL)


def test_state_batches_branches_and_travels():
    model = make_model()
    ids = ids_for(model, 3, 27)
    with torch.no_grad():
        st = model.forward_segment(ids[:, :19]).state
        cont = ids[:, 19:]
        ref = model.forward_segment(cont, st).logits
        # branch per row (repeat), select rows, cat, numpy round trip
        rep = st.repeat_interleave(2)
        out = model.forward_segment(cont.repeat_interleave(2, 0), rep).logits
        torch.testing.assert_close(out[::2], ref, rtol=0, atol=ATOL)
        parts = ModelState.cat([st.index([2]), st.index([0, 1])])
        torch.testing.assert_close(model.forward_segment(cont[[2, 0, 1]], parts).logits, ref[[2, 0, 1]],
                                   rtol=0, atol=ATOL)
        back = ModelState.from_numpy(st.to_numpy())
        torch.testing.assert_close(model.forward_segment(cont, back).logits, ref, rtol=0, atol=0)


def test_right_padding_never_leaks_and_loss_ignores_pads():
    model = make_model()
    lens = [41, 18, 33]
    S = 48
    rows = [ids_for(model, 1, n, seed=10 + i)[0] for i, n in enumerate(lens)]
    results = []
    for fill in (0, 7):  # two different pad contents
        ids = torch.full((3, S), fill, dtype=torch.long)
        mask = torch.zeros(3, S, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        results.append(model(ids, attention_mask=mask, labels=ids))
    total_tokens, total_nll = 0, 0.0
    for i, r in enumerate(rows):
        alone = model(r[None], labels=r[None])
        for res in results:
            torch.testing.assert_close(res.logits[i, :len(r)], alone.logits[0], rtol=0, atol=ATOL)
        total_nll = total_nll + alone.loss * (len(r) - 1)
        total_tokens += len(r) - 1
    for res in results:
        torch.testing.assert_close(res.loss, total_nll / total_tokens, rtol=1e-5, atol=1e-6)


def test_left_padding_is_rejected():
    model = make_model()
    ids = ids_for(model, 2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="right padding only"):
        model(ids, attention_mask=mask)


def test_hidden_states_and_return_tuple():
    model = make_model()
    ids = ids_for(model, 1, 12)
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], model.forward_segment(ids).hidden, rtol=0, atol=0)
    assert model(ids, return_dict=False)[0].shape == (1, 12, model.config.vocab_size)


def test_save_load_round_trip_with_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = make_model()
    model.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, LaCTConfig) and cfg.model_type == "lact" and cfg.lact_chunk_size == 16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LaCTForCausalLM)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        torch.testing.assert_close(sd2[k], sd[k], rtol=0, atol=0, msg=k)
    ids = ids_for(model, 1, 20)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_default_config_is_lact_760m():
    cfg = LaCTConfig()
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attn_heads, cfg.head_dim) == (24, 1536, 24, 64)
    assert (cfg.num_lact_heads, cfg.fw_head_dim, cfg.inter_multi) == (4, 384, 1.0)
    assert (cfg.lact_chunk_size, cfg.window_size, cfg.w0_w2_low_rank) == (2048, 2048, 32)
    assert cfg.use_momentum and not cfg.use_muon and cfg.learnable_ttt_scale
    assert (cfg.rope_theta, cfg.intermediate_size, cfg.vocab_size) == (1e6, 4096, 32000)


def test_gradient_checkpointing_gives_same_grads():
    model = make_model()
    model.train()
    ids = ids_for(model, 2, 37)

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.model.gradient_checkpointing = True
    ckpt = grads()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_low_precision_state_and_empty_segment():
    model = make_model()
    ids = ids_for(model, 1, 30)
    with torch.no_grad():
        st = model.forward_segment(ids[:, :20]).state
        ref = model.forward_segment(ids[:, 20:], st).logits
        low = model.forward_segment(ids[:, 20:], st.to(dtype=torch.bfloat16)).logits
    assert (low - ref).abs().max() < 0.2  # a bf16-rounded state still runs (upcast inside)
    with pytest.raises(ValueError, match="T >= 1"):
        model.forward_segment(ids[:, :0], st)

"""DeltaNet / GatedDeltaNet models: fla checkpoint compatibility, state carrying, HF loss.

Tolerances (fp32, tiny models): logits within 1e-4 absolute; parameter gradients within
1e-5 relative to the gradient's largest entry (entries reach ~50; measured ~2e-6 relative);
state-dict round trips are exact.
"""
import json

import fla.models as fla_models
import pytest
import torch
from fla.models import DeltaNetConfig, GatedDeltaNetConfig
from transformers import AutoModelForCausalLM

from refine_ray.models import registry
from refine_ray.models.base import ModelState
from refine_ray.models.deltanet import DeltaNetForCausalLM, GatedDeltaNetForCausalLM

ATOL = 1e-4
V = 97
CONFIGS = {
    "delta_net": lambda **kw: DeltaNetConfig(**dict(hidden_size=32, num_hidden_layers=2, num_heads=2,
                                                    intermediate_size=64, vocab_size=V, **kw)),
    "gated_deltanet": lambda **kw: GatedDeltaNetConfig(**dict(hidden_size=32, num_hidden_layers=2, num_heads=2,
                                                              head_dim=8, intermediate_size=64, vocab_size=V, **kw)),
}
OURS = {"delta_net": DeltaNetForCausalLM, "gated_deltanet": GatedDeltaNetForCausalLM}
FLA = {"delta_net": fla_models.DeltaNetForCausalLM, "gated_deltanet": fla_models.GatedDeltaNetForCausalLM}
VARIANTS = [
    ("delta_net", {}),
    ("delta_net", {"use_gate": True, "qk_activation": "relu", "qk_norm": "sum", "allow_neg_eigval": True}),
    ("delta_net", {"use_short_conv": False, "use_beta": False, "qk_activation": "elu", "expand_v": 2.0}),
    ("gated_deltanet", {}),
    ("gated_deltanet", {"num_v_heads": 4, "use_gate": False}),
]


def _model(kind, seed=0, **kw):
    torch.manual_seed(seed)
    return OURS[kind](CONFIGS[kind](**kw)).eval()


def _ids(B=2, T=70, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("kind,kw", VARIANTS)
def test_state_dict_matches_fla(kind, kw):
    cfg = CONFIGS[kind](**kw)
    ours = {k: tuple(v.shape) for k, v in OURS[kind](cfg).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in FLA[kind](cfg).state_dict().items()}
    assert ours == theirs


@pytest.mark.parametrize("kind", ["delta_net", "gated_deltanet"])
def test_checkpoints_load_both_ways(kind, tmp_path):
    cfg = CONFIGS[kind]()
    theirs = FLA[kind](cfg)
    theirs.save_pretrained(tmp_path / "fla")
    ours = registry.load_model(str(tmp_path / "fla"))
    assert type(ours) is OURS[kind]
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == kind
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"))
    assert type(back) is FLA[kind]
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("kind,kw", VARIANTS)
def test_chunked_forward_equals_token_by_token_decoding(kind, kw):
    model = _model(kind, **kw)
    ids = _ids(T=70)  # > one 64-token chunk, not a multiple of it
    with torch.no_grad():
        full = model.forward_segment(ids)
        state, steps = None, []
        for t in range(ids.shape[1]):
            out = model.forward_segment(ids[:, t:t + 1], state)
            state = out.state
            steps.append(out.logits)
    assert _maxdiff(torch.cat(steps, 1), full.logits) < ATOL
    assert state.offset == ids.shape[1] == full.state.offset
    for a, b in zip(state.layers, full.state.layers):
        assert a.keys() == b.keys()
        for key in a:
            assert _maxdiff(a[key], b[key]) < ATOL, key


@pytest.mark.parametrize("kind", ["delta_net", "gated_deltanet"])
def test_segment_carry_equals_one_forward_with_gradients(kind):
    model = _model(kind).train()
    ids = _ids(T=90, seed=1)
    w = torch.randn(2, 90, V, generator=torch.Generator().manual_seed(2))
    full = model.forward_segment(ids)
    g_full = torch.autograd.grad((full.logits * w).sum(), list(model.parameters()), allow_unused=True)
    state, parts = None, []
    for lo, hi in ((0, 3), (3, 41), (41, 90)):  # a segment shorter than the conv width, then odd lengths
        out = model.forward_segment(ids[:, lo:hi], state)
        state = out.state
        parts.append(out.logits)
    seg_logits = torch.cat(parts, 1)
    g_seg = torch.autograd.grad((seg_logits * w).sum(), list(model.parameters()), allow_unused=True)
    assert _maxdiff(seg_logits, full.logits) < ATOL
    for (name, _), a, b in zip(model.named_parameters(), g_full, g_seg):
        if a is None:
            assert b is None, name
            continue
        assert _maxdiff(a, b) <= 1e-5 * max(1.0, a.abs().max().item()), name


def test_gradient_flows_into_initial_state():
    model = _model("gated_deltanet")
    first = model.forward_segment(_ids(T=10))
    state = first.state._map(lambda t: t.detach().requires_grad_())
    out = model.forward_segment(_ids(T=5, seed=3), state)
    grads = torch.autograd.grad(out.logits.sum(), [t for layer in state.layers for t in layer.values()])
    assert all(g.abs().sum() > 0 for g in grads)


def test_state_batch_ops_and_numpy_roundtrip():
    model = _model("delta_net")
    st = model.forward_segment(_ids(B=3, T=9)).state
    again = ModelState.from_numpy(st.to_numpy())
    assert again.offset == 9 and again.batch_size == 3
    nxt = _ids(B=3, T=4, seed=5)
    with torch.no_grad():
        a = model.forward_segment(nxt, st).logits
        b = model.forward_segment(nxt, again).logits
        c = model.forward_segment(nxt[[2, 0]], st.index([2, 0])).logits
    assert _maxdiff(a, b) == 0
    assert _maxdiff(a[[2, 0]], c) < ATOL


@pytest.mark.parametrize("kind", ["delta_net", "gated_deltanet"])
def test_hf_loss_ignores_pads_and_ignore_index(kind):
    model = _model(kind)
    ids = _ids(B=2, T=12, seed=4)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0                                   # row 1: 7 real tokens, right padded
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        logits = model.forward_segment(ids).logits
    lp = torch.log_softmax(logits.float(), -1)
    terms = [-lp[0, t - 1, ids[0, t]] for t in range(1, 12) if t != 3]
    terms += [-lp[1, t - 1, ids[1, t]] for t in range(1, 7)]
    assert abs(out.loss.item() - torch.stack(terms).mean().item()) < 1e-5
    garbage = ids.clone()
    garbage[1, 7:] = 5                                # pad ids/labels must not matter
    out2 = model(garbage, attention_mask=mask, labels=garbage.masked_fill(labels == -100, -100))
    assert abs(out.loss.item() - out2.loss.item()) < 1e-6
    assert out.logits.shape == (2, 12, V)


def test_hf_forward_rejects_left_padding():
    model = _model("delta_net")
    ids = _ids(B=2, T=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=mask)


def test_unsupported_config_options_raise():
    with pytest.raises(NotImplementedError, match="attn"):
        DeltaNetForCausalLM(CONFIGS["delta_net"](attn={"layers": [1], "num_heads": 2}))
    with pytest.raises(NotImplementedError, match="attnres_block_size"):
        GatedDeltaNetForCausalLM(CONFIGS["gated_deltanet"](attnres_block_size=2))


def test_registry_build_tiny_and_errors(tmp_path):
    a = registry.build_model("delta_net", vocab_size=50, seed=7)
    b = registry.build_model("delta_net", vocab_size=50, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config.hidden_size == 64 and a.config.num_hidden_layers == 2 and a.config.vocab_size == 50
    g = registry.build_model("gated_deltanet", vocab_size=50, hidden_size=32, num_heads=4, num_hidden_layers=1)
    assert g.config.head_dim == 8 and g.forward_segment(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 50)
    with pytest.raises(ValueError, match="supported: delta_net, gated_deltanet, lact"):
        registry.build_model("mamba", vocab_size=50)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba2"}))
    with pytest.raises(ValueError, match="unknown model_type 'mamba2'"):
        registry.load_model(str(tmp_path))


def test_registry_lact_hook():
    pytest.importorskip("refine_ray.models.lact")
    m = registry.build_model("lact", vocab_size=64, seed=0)
    assert m.config.model_type == "lact"
    assert registry.tiny_config("lact", 64).vocab_size == 64


@pytest.mark.parametrize("model_type", ["delta_net", "gated_deltanet", "lact"])
def test_hf_embedding_accessors(model_type):
    """transformers' accessors (derived from ``_input_embed_layer``) find our layers."""
    model = registry.build_model(model_type, seed=0, vocab_size=50)
    backbone = model.model
    assert model.get_input_embeddings() is backbone.embeddings is backbone.get_input_embeddings()
    assert model.get_output_embeddings() is model.lm_head
    assert model.get_decoder() is backbone
    new_in, new_out = torch.nn.Embedding(50, backbone.embeddings.embedding_dim), torch.nn.Linear(
        backbone.embeddings.embedding_dim, 50, bias=False)
    model.set_input_embeddings(new_in)
    model.set_output_embeddings(new_out)
    assert backbone.embeddings is new_in and model.lm_head is new_out
    model.resize_token_embeddings(53)
    assert model.get_input_embeddings().num_embeddings == 53 and model.lm_head.out_features == 53
    assert model.forward_segment(torch.tensor([[1, 52]])).logits.shape == (1, 2, 53)

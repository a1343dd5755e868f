"""The model registry is the single source of model families; shared layers and rules have one home.

Every registry entry builds its tiny preset, runs the segment contract and round-trips
save_pretrained / load_model; config validation, the vLLM backend and the benchmarks read the
registry's lists; no module outside the registry and the family folders compares against or
lists model-type names; the compute-dtype rule and the offset-free predicate each live once.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refine_ray.config import ConfigError, load_config
from refine_ray.models import registry
from refine_ray.models.base import offset_free_state
from refine_ray.models.dtypes import compute_dtype
from refine_ray.models.generation import prefill
from refine_ray.models.layers.common import GatedMLP, PreNormBlock, RMSNorm

ROOT = Path(__file__).resolve().parents[2]
V = 61


@pytest.mark.parametrize("model_type", registry.MODEL_TYPES)
def test_every_family_builds_runs_and_round_trips(model_type, tmp_path):
    fam = registry.family(model_type)
    classes = fam.classes()
    model = registry.build_model(model_type, seed=0, vocab_size=V).eval()
    assert isinstance(model, classes.causal_lm) and isinstance(model.config, classes.config)
    assert model.config.model_type == model_type and model.config.vocab_size == V
    assert offset_free_state(model) is fam.offset_free_state
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model.forward_segment(ids)
        part = model.forward_segment(ids[:, 4:], model.forward_segment(ids[:, :4]).state)
    assert whole.logits.shape == (2, 9, V)
    torch.testing.assert_close(part.logits, whole.logits[:, 4:], rtol=1e-5, atol=1e-5)
    # seeded builds are reproducible and leave the global RNG alone
    before = torch.random.get_rng_state()
    again = registry.build_model(model_type, seed=0, vocab_size=V)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert registry.model_type_of(str(tmp_path)) == model_type
    loaded = registry.load_model(str(tmp_path)).eval()
    assert type(loaded) is classes.causal_lm
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_segment(ids).logits, whole.logits, rtol=0, atol=0)


def test_registry_lists_and_unknown_types():
    assert registry.MODEL_TYPES == tuple(registry.FAMILIES)
    assert registry.VLLM_TYPES == tuple(t for t in registry.MODEL_TYPES if registry.family(t).vllm)
    assert set(registry.FAST_WEIGHT_TYPES) == {"delta_net", "gated_deltanet", "lact"}
    for bad in ("mamba2", None):
        with pytest.raises(ValueError) as e:
            registry.family(bad)
        assert str(e.value) == f"unknown model_type {bad!r}; supported: {', '.join(registry.MODEL_TYPES)}"
    with pytest.raises(ValueError, match="unknown model_type 'mamba'"):
        registry.build_model("mamba", vocab_size=50)


def test_config_validation_reads_the_registry():
    """model.type is checked against the registry: one line listing exactly its types."""
    for t in registry.MODEL_TYPES:
        assert load_config(None, [f"model.type={t}"]).model.type == t
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.type=mamba2"])
    listed = ", ".join(repr(t) for t in registry.MODEL_TYPES)
    assert str(e.value) == f"model.type: 'mamba2' is not one of {listed}"
    assert "\n" not in str(e.value)
    non_vllm = next(t for t in registry.MODEL_TYPES if t not in registry.VLLM_TYPES)
    with pytest.raises(ConfigError, match=f"rollout.backend: vllm serves .*not {non_vllm}"):
        load_config(None, [f"model.type={non_vllm}", "rollout.backend=vllm", "refine.prefix_sharing=false"])


def _model_type_literals(path: Path) -> list[tuple[int, str]]:
    """(line, name) of model-type strings that a comparison, a collection literal or a dict key
    holds: the forms a private list of model types takes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            consts = [node.left, *node.comparators]
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            consts = node.elts
        elif isinstance(node, ast.Dict):
            consts = [k for k in node.keys if k is not None]
        else:
            continue
        found += [(node.lineno, c.value) for c in consts
                  if isinstance(c, ast.Constant) and c.value in registry.MODEL_TYPES]
    return found


def test_no_model_type_list_outside_the_registry():
    own = ("refine_ray/models/registry.py", "refine_ray/models/deltanet/", "refine_ray/models/lact/",
           "refine_ray/models/llama/")
    files = [*ROOT.glob("refine_ray/**/*.py"), *ROOT.glob("roles/*.py"), *ROOT.glob("scripts/*.py")]
    hits = [f"{p.relative_to(ROOT)}:{line} {name!r}" for p in files
            if not p.relative_to(ROOT).as_posix().startswith(own) for line, name in _model_type_literals(p)]
    assert not hits, "model-type names outside the registry (read refine_ray.models.registry instead): " + \
        "; ".join(hits)


def test_registry_and_config_import_without_torch():
    code = ("import sys; import refine_ray.models.registry, refine_ray.config; "
            "assert 'torch' not in sys.modules and 'fla' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_families_share_the_common_layers():
    """RMSNorm, the SwiGLU MLP and the block exist once: every family is built from them."""
    for t in registry.FAST_WEIGHT_TYPES:
        model = registry.build_model(t, seed=0, vocab_size=V)
        blocks = list(model.model.layers)
        assert blocks and all(type(b) is PreNormBlock for b in blocks)
        assert all(type(b.mlp) is GatedMLP and type(b.attn_norm) is RMSNorm for b in blocks)
        assert type(model.model.norm) is RMSNorm
        norms = {type(m) for n, m in model.named_modules() if n.endswith("norm")}
        assert norms <= {RMSNorm} | {type(m) for m in model.modules() if type(m).__name__ == "GatedRMSNorm"}


def test_offset_free_predicate_drives_prefill():
    prompts = [torch.arange(3), torch.arange(5)]
    for t in registry.MODEL_TYPES:
        model = registry.build_model(t, seed=0, vocab_size=V)
        if registry.family(t).offset_free_state:
            state, hidden = prefill(model, prompts)
            assert state.batch_size == 2 and hidden.shape[0] == 2
        else:
            with pytest.raises(ValueError, match="different offsets"):
                prefill(model, prompts)


def test_compute_dtype_is_bf16_only_on_cuda():
    """bfloat16 on CUDA; asked for elsewhere it raises one line, never a silent float32 run."""
    assert compute_dtype("float32", "cuda") == torch.float32
    assert compute_dtype("float32", "cpu") == torch.float32
    assert compute_dtype("bfloat16", "cuda") == torch.bfloat16
    for device in ("cpu", torch.device("cpu")):
        with pytest.raises(ValueError, match=r"^model.dtype: bfloat16 needs a CUDA GPU but this model runs on cpu"):
            compute_dtype("bfloat16", device)
    if torch.cuda.is_available():
        assert compute_dtype("bfloat16") == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="^model.dtype: bfloat16 needs a CUDA GPU and none is visible here"):
            compute_dtype("bfloat16")
    with pytest.raises(ValueError, match="model.dtype: 'float16' is not one of float32, bfloat16"):
        compute_dtype("float16")


def test_no_other_copy_of_the_dtype_rule():
    """The bf16-on-CUDA rule is written only in models/dtypes.py (the issue counted five copies)."""
    copies = []
    for p in [*ROOT.glob("refine_ray/**/*.py"), *ROOT.glob("roles/*.py")]:
        if p.name == "dtypes.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if '== "bfloat16"' in line and ("cuda" in line or "gpu" in line):
                copies.append(f"{p.relative_to(ROOT)}:{i}")
    assert not copies, f"the bf16-only-on-CUDA rule written outside models/dtypes.py: {copies}"


def test_one_right_padding_check_for_every_fast_weight_family():
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
    left_padded = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    messages = set()
    for t in registry.FAST_WEIGHT_TYPES:
        model = registry.build_model(t, seed=0, vocab_size=V)
        with pytest.raises(ValueError, match="right padding only") as e:
            model(input_ids=ids, attention_mask=left_padded)
        messages.add(str(e.value))
        right_padded = left_padded.flip(1)
        loss = model(input_ids=ids, attention_mask=right_padded, labels=ids).loss
        assert torch.isfinite(loss)
    assert len(messages) == 1


def test_the_offset_free_predicate_has_one_name_and_one_home():
    """``offset_free_state``: declared by each family's causal-LM class, read by base.offset_free_state and
    the registry entry; no second name for it (``one_pass`` was one) anywhere in the code."""
    for t in registry.MODEL_TYPES:
        cls = registry.family(t).classes().causal_lm
        assert isinstance(cls.offset_free_state, bool) and registry.family(t).offset_free_state is cls.offset_free_state
    with pytest.raises(ValueError, match="^Linear declares no offset_free_state"):
        offset_free_state(torch.nn.Linear(2, 2))
    other_names = []
    for p in [*ROOT.glob("refine_ray/**/*.py"), *ROOT.glob("roles/*.py"), *ROOT.glob("scripts/*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            name = (getattr(node, "name", None) or getattr(node, "id", None) or getattr(node, "attr", None)
                    or getattr(node, "arg", None) or getattr(node, "asname", None))
            if isinstance(name, str) and "one_pass" in name:
                other_names.append(f"{p.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not other_names, f"a second name for offset_free_state: {other_names}"

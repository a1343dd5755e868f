"""The plugin's CUDA branch and tensor parallelism, checked on CPU (issue 21 points 1, 3, 5, 6).

Runs where vLLM is installed (``.venv-vllm``). The model is built outside an engine by
``tests/serving/vllm_layers.py`` in one process per TP rank (vLLM's parallel state on gloo), so
the same code a CUDA engine builds is loaded, sharded and run here:

  * shards: every parameter of every rank equals the slice of fla's checkpoint that vLLM's
    sharding gives it (column-parallel: rows of this rank's heads; row-parallel: columns;
    vocab-parallel: this rank's vocabulary rows; norms replicated), every fla tensor is used,
    at TP 2 and 4;
  * the CUDA branch (vLLM's own GDN core, ``OlmoHybridGatedDeltaNetAttention._forward_core``)
    runs its Triton decode kernels in Triton's interpreter on CPU tensors; fp32 prefills take the
    PyTorch core over the same (transposed) state memory, as on a GPU. Log-probs of every token
    of four engine-like steps (prefill, decode, a mixed step with a chunked continuation, decode)
    are compared with refine_ray's own fp32 forward;
  * the CPU cores with TP (vLLM's CPU build runs TP too) and the CPU kernels' bf16 path.
What only a GPU can show (the compiled Triton kernels, bf16 chunk prefill, CUDA graphs, NCCL)
is in tests/serving/test_vllm_gpu.py, run by scripts/gpu_check_vllm.sh.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM not installed: bash scripts/setup_vllm.sh, then run with .venv-vllm")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU checks of the CUDA branch; on a GPU "
                                "tests/serving/test_vllm_gpu.py runs it for real (scripts/gpu_check_vllm.sh)")

from safetensors.torch import load_file  # noqa: E402

from refine_ray.models import registry  # noqa: E402
from refine_ray.serving.vllm_models import checkpoint_names  # noqa: E402
from refine_ray.serving.vllm_mixer import select_core  # noqa: E402

V = 101
HARNESS = Path(__file__).with_name("vllm_layers.py")
FP32_ATOL = 1e-4
GDN_GVA = dict(num_heads=2, num_v_heads=4, head_dim=32, expand_v=2.0, conv_size=3, allow_neg_eigval=True)
GDN_TP4 = dict(num_heads=4, num_v_heads=8, head_dim=16)


def _save(tmp_path, model_type, dtype=torch.float32, **fields):
    model = registry.build_model(model_type, seed=0, vocab_size=V, **fields).to(dtype)
    d = tmp_path / "ckpt"
    model.save_pretrained(d, safe_serialization=True)
    return d


def _run(model_dir, out, tp=1, dtype="float32", core=None, interpret=False, check=True):
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, str(HARNESS), str(model_dir), str(out), "--tp", str(tp), "--dtype", dtype] + (["--core", core] if core else []) + (["--interpret"] if interpret else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=840)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _logprob_error(model_dir, out) -> float:
    """max |log_softmax(vLLM logits) - log_softmax(refine_ray fp32 forward)| over every scheduled token."""
    ref_model = registry.load_model(str(model_dir), dtype=torch.float32).eval()
    got, run = load_file(out / "logits.safetensors"), json.loads((out / "run.json").read_text())
    ref = {}
    with torch.no_grad():
        for key, seq in got.items():
            if key.startswith("tokens_"):
                ref[key[len("tokens_"):]] = torch.log_softmax(ref_model.forward_segment(seq[None]).logits[0].float(), -1)
    lp = torch.log_softmax(got["logits"], -1)
    assert len(run["positions"]) == lp.shape[0] == sum(len(t) for t in ref.values())
    return max((lp[row] - ref[s][int(j)]).abs().max().item()
               for row, (s, j) in enumerate(p.split(":") for p in run["positions"]))


def _expected_shards(full: dict, config, rank: int, world: int) -> dict:
    """fla tensors -> this rank's vLLM parameters, by vLLM's sharding rules (written out independently)."""
    def rows(t):
        n = t.shape[0] // world
        return t[rank * n:(rank + 1) * n]

    def cols(t):
        n = t.shape[1] // world
        return t[:, rank * n:(rank + 1) * n]

    def vocab(t):
        per = -(-V // 64) * 64 // world           # VocabParallelEmbedding pads the vocabulary to 64
        return t[rank * per:(rank + 1) * per], per

    out, used = {}, set()

    def take(name):
        used.add(name)
        return full[name]

    for name in full:
        if name.startswith("model.layers."):
            continue
        if name in ("model.embeddings.weight", "lm_head.weight"):
            out[name] = vocab(take(name))
        else:
            out[name] = take(name)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "attn."
        parts = ["q_proj", "k_proj", "v_proj"] + (["g_proj"] if config.use_gate else [])
        out[a + "in_proj.weight"] = torch.cat([rows(take(f"{a}{n}.weight")) for n in parts])
        if config.use_short_conv:
            out[a + "conv1d.weight"] = torch.cat([rows(take(f"{a}{n}_conv1d.weight")) for n in "qkv"])
        for n in ("b_proj.weight", "a_proj.weight", "A_log", "dt_bias"):
            if a + n in full:
                out[a + n] = rows(take(a + n))
        out[a + "o_norm.weight"] = take(a + "o_norm.weight")
        out[a + "o_proj.weight"] = cols(take(a + "o_proj.weight"))
        out[p + "mlp.gate_up_proj.weight"] = torch.cat([rows(take(p + "mlp.gate_proj.weight")),
                                                        rows(take(p + "mlp.up_proj.weight"))])
        out[p + "mlp.down_proj.weight"] = cols(take(p + "mlp.down_proj.weight"))
        for n in ("attn_norm.weight", "mlp_norm.weight"):
            out[p + n] = take(p + n)
    assert used == set(full), f"fla tensors no parameter takes: {sorted(set(full) - used)}"
    return out


def _check_shards(model_dir, out, world: int) -> None:
    full = load_file(Path(model_dir) / "model.safetensors")
    config = registry.load_model(str(model_dir), dtype=torch.float32).config
    for rank in range(world):
        got = load_file(out / f"rank{rank}.safetensors")
        want = _expected_shards(full, config, rank, world)
        assert set(got) == set(want), (sorted(set(got) ^ set(want)))
        for name, w in want.items():
            if isinstance(w, tuple):                   # vocabulary rows: the valid ones, then zero padding
                w, per = w
                assert got[name].shape == (per, w.shape[1]), name
                assert torch.equal(got[name][:len(w)], w.to(got[name].dtype)), name
                assert not got[name][len(w):].any(), name
            else:
                assert got[name].shape == w.shape, (name, got[name].shape, w.shape)
                assert torch.equal(got[name], w.to(got[name].dtype)), name


# ---------------------------------------------------------------------------- which core, where
def test_cuda_branch_selected_by_platform():
    """The CUDA platform gets vLLM's Triton GDN core; CPU its C++ kernels or the PyTorch core;
    configs vLLM's CUDA core cannot take and other platforms are refused in one line."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import Platform, PlatformEnum

    class Cuda(Platform):
        _enum, device_name = PlatformEnum.CUDA, "cuda"

    class Xpu(Platform):
        _enum, device_name = PlatformEnum.XPU, "xpu"

    gdn = registry.build_model("gated_deltanet", seed=0, vocab_size=V).config
    assert select_core(Cuda(), gdn, torch.float32, 32, 32) == ("cuda", None)
    assert select_core(Cuda(), gdn, torch.bfloat16, 128, 128) == ("cuda", None)
    assert select_core(CpuPlatform(), gdn, torch.bfloat16, 64, 64) == ("cpu_kernel", None)
    core, why = select_core(CpuPlatform(), gdn, torch.float32, 32, 32)
    assert core == "torch" and "bf16 only" in why
    gdn.conv_size = 5
    with pytest.raises(NotImplementedError, match=r"^conv_size=5: .* widths \(2, 3, 4\)$"):
        select_core(Cuda(), gdn, torch.bfloat16, 32, 32)
    with pytest.raises(NotImplementedError, match=r"runs on CUDA and CPU platforms, not 'xpu'$"):
        select_core(Xpu(), gdn, torch.bfloat16, 32, 32)


# ---------------------------------------------------------------------------- weights
@pytest.mark.parametrize("model_type,fields", [
    ("gated_deltanet", {}),
    ("gated_deltanet", dict(use_gate=False, use_short_conv=False, tie_word_embeddings=True)),
    ("delta_net", {}),
    ("delta_net", dict(use_beta=False, use_gate=True, conv_bias=True)),   # fla ignores conv_bias
], ids=["gdn", "gdn-nogate-noconv-tied", "dn", "dn-nobeta-gate-convbias"])
def test_checkpoint_names_are_fla_layout(tmp_path, model_type, fields):
    """The names the loader requires are exactly what fla's / refine_ray's save_pretrained writes."""
    d = _save(tmp_path, model_type, **fields)
    written = set(load_file(d / "model.safetensors"))
    gated = model_type == "gated_deltanet"
    assert set(checkpoint_names(registry.load_model(str(d)).config, gated)) == written


def test_checkpoint_missing_a_tensor_is_refused(tmp_path):
    """A checkpoint without model.layers.1.attn.A_log stops loading with vLLM's own message
    (it used to load and generate from uninitialised memory)."""
    from safetensors.torch import save_file

    d = _save(tmp_path, "gated_deltanet")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.attn.A_log"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    proc = _run(d, tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert ("ValueError: Following weights were not initialized from checkpoint: "
            "['model.layers.1.attn.A_log']") in proc.stderr


# ---------------------------------------------------------------------------- TP and the CUDA branch
def test_tp2_cuda_branch_shards_and_logprobs(tmp_path):
    """TP 2 through vLLM's CUDA core (Triton interpreter): GatedDeltaNet with grouped value heads,
    expand_v 2, conv width 3, allow_neg_eigval; shards as vLLM's loaders take them, log-probs as ours."""
    d = _save(tmp_path, "gated_deltanet", **GDN_GVA)
    out = tmp_path / "out"
    _run(d, out, tp=2, core="cuda", interpret=True)
    _check_shards(d, out, 2)
    err = _logprob_error(d, out)
    print(f"TP2 cuda-branch GatedDeltaNet GVA fp32 max |dlogp| {err:.2e}")
    assert err <= FP32_ATOL


def test_deltanet_cuda_branch_logprobs(tmp_path):
    """DeltaNet through vLLM's gated CUDA core: zero decay (A_log = -inf), beta = 1 without b_proj,
    gate-free fp32 o_norm."""
    d = _save(tmp_path, "delta_net", use_beta=False, allow_neg_eigval=True)
    out = tmp_path / "out"
    _run(d, out, core="cuda", interpret=True)
    err = _logprob_error(d, out)
    print(f"cuda-branch DeltaNet (use_beta=False, allow_neg_eigval) fp32 max |dlogp| {err:.2e}")
    assert err <= FP32_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("model_type,fields", [
    ("gated_deltanet", {}),
    ("gated_deltanet", dict(use_gate=False, use_short_conv=False)),
    ("gated_deltanet", dict(output_gate_activation="sigmoid")),
    ("delta_net", {}),
    ("delta_net", dict(use_gate=True, expand_v=2.0, use_short_conv=False)),
], ids=["gdn", "gdn-nogate-noconv", "gdn-sigmoid-gate", "dn", "dn-gate-expandv2-noconv"])
def test_cuda_branch_config_branches(tmp_path, model_type, fields):
    d = _save(tmp_path, model_type, **fields)
    out = tmp_path / "out"
    _run(d, out, core="cuda", interpret=True)
    err = _logprob_error(d, out)
    print(f"cuda-branch {model_type} {fields} fp32 max |dlogp| {err:.2e}")
    assert err <= FP32_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("core", ["cuda", "torch"])
def test_tp4_shards_and_logprobs(tmp_path, core):
    """TP 4 (4 key heads, 8 value heads): through the CUDA branch (interpreter) and the CPU PyTorch core."""
    d = _save(tmp_path, "gated_deltanet", **GDN_TP4)
    out = tmp_path / "out"
    _run(d, out, tp=4, core=core, interpret=core == "cuda")
    _check_shards(d, out, 4)
    err = _logprob_error(d, out)
    print(f"TP4 {core} GatedDeltaNet fp32 max |dlogp| {err:.2e}")
    assert err <= FP32_ATOL


@pytest.mark.slow
def test_tp2_cpu_torch_core_deltanet(tmp_path):
    d = _save(tmp_path, "delta_net", expand_v=2.0)
    out = tmp_path / "out"
    _run(d, out, tp=2)
    _check_shards(d, out, 2)
    assert json.loads((out / "run.json").read_text())["cores"] == ["torch"]
    err = _logprob_error(d, out)
    print(f"TP2 torch DeltaNet expand_v 2 fp32 max |dlogp| {err:.2e}")
    assert err <= FP32_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("fields", [dict(), dict(use_beta=False)], ids=["dn", "dn-nobeta"])
def test_cpu_kernel_bf16_deltanet(tmp_path, fields):
    """vLLM's bf16 CPU kernels (head dim 64) against our fp32 forward on the same bf16 weights,
    within twice our own bf16 model's deviation; use_beta=False must give beta = 1 (fla)."""
    d = _save(tmp_path, "delta_net", dtype=torch.bfloat16, hidden_size=128, num_heads=2, **fields)
    out = tmp_path / "out"
    _run(d, out, dtype="bfloat16")
    assert json.loads((out / "run.json").read_text())["cores"] == ["cpu_kernel"]
    err = _logprob_error(d, out)
    ours = registry.load_model(str(d), dtype=torch.bfloat16).eval()
    ref = registry.load_model(str(d), dtype=torch.float32).eval()
    tokens = load_file(out / "logits.safetensors")
    with torch.no_grad():
        floor = max((torch.log_softmax(ours.forward_segment(t[None]).logits.float(), -1)
                     - torch.log_softmax(ref.forward_segment(t[None]).logits.float(), -1)).abs().max().item()
                    for k, t in tokens.items() if k.startswith("tokens_"))
    print(f"cpu-kernel bf16 DeltaNet {fields}: max |dlogp| {err:.3f}, our bf16 {floor:.3f}")
    assert err <= 2 * floor

"""The vLLM plugin on a CUDA GPU (issue 21 point 6): run by ``bash scripts/gpu_check_vllm.sh``.

Needs the CUDA build of vLLM (``bash scripts/setup_vllm.sh --cuda``) and a GPU; marked ``gpu``
(deselected by default, ``-m gpu`` selects them) and skipped without CUDA. Not yet run: no GPU
with a CUDA vLLM has been available to this project (docs/vllm.md).

  * log-prob parity against refine_ray's own model on the same GPU (fp32: max |dlogp| <= 1e-3
    and greedy equal; bf16: within twice our own bf16 model's deviation from fp32, max and mean),
    prompts of 5 to 300 tokens (several of the chunk kernel's 64-token chunks) and 8 decoded tokens,
    both families, with vLLM's default compilation and CUDA graphs;
  * CUDA graphs on (vLLM's default FULL_AND_PIECEWISE) and off (``enforce_eager``) give the same
    greedy tokens and log-probs (fp32);
  * tensor parallel size 2 (skipped with fewer than two GPUs) equals size 1;
  * the rollout engine (``rollout.backend=vllm``) on CUDA: behaviour log-probs equal a re-encode.
"""
import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM not installed: bash scripts/setup_vllm.sh --cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and the CUDA build of vLLM")]

from refine_ray.models import registry  # noqa: E402
from refine_ray.serving.vllm_rollout import shutdown_engine  # noqa: E402

V, K_NEW = 1000, 8
PROMPT_LENS = (5, 37, 90, 300)
FIELDS = {"gated_deltanet": dict(hidden_size=256, num_heads=2, num_hidden_layers=2),      # head dim 128
          "delta_net": dict(hidden_size=256, num_heads=2, num_hidden_layers=2)}
FP32_ATOL = 1e-3


@pytest.fixture(autouse=True, scope="module")
def _exact_fp32_reference():
    """Our model as the reference in IEEE fp32: its PyTorch ops (REFINE_KERNELS=torch; fla's Triton
    dots default to TF32) and no TF32 in cuDNN's convolutions. vLLM keeps fp32 matmuls at
    'highest' precision by default (VLLM_FLOAT32_MATMUL_PRECISION)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFINE_KERNELS", "torch")
        mp.setattr(torch.backends.cudnn, "allow_tf32", False)
        yield


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, V, n).tolist() for n in PROMPT_LENS]


def _serve(path, dtype: str, **kw):
    return vllm.LLM(model=str(path), skip_tokenizer_init=True, dtype=dtype, gpu_memory_utilization=0.3,
                    max_model_len=512, seed=0, **kw)


def _generate(llm, prompts):
    """Per prompt: (greedy tokens, log-probs of prompt tokens 1.. then of the greedy tokens)."""
    sp = vllm.SamplingParams(max_tokens=K_NEW, temperature=0.0, logprobs=0, prompt_logprobs=0, ignore_eos=True,
                             detokenize=False)
    res = []
    for p, o in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)):
        gen = list(o.outputs[0].token_ids)
        lp = [o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))]
        lp += [s[t].logprob for s, t in zip(o.outputs[0].logprobs, gen)]
        res.append((gen, np.array(lp)))
    return res


def _ours(model, prompt, gen):
    seq = torch.tensor([prompt + gen], device="cuda")
    with torch.no_grad():
        lp = torch.log_softmax(model.forward_segment(seq).logits.float(), -1)[0]
    return lp[:-1].gather(-1, seq[0, 1:, None])[:, 0].cpu().numpy(), lp[len(prompt) - 1:-1].argmax(-1).tolist()


@pytest.fixture(scope="module", params=sorted(FIELDS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    registry.build_model(request.param, seed=0, vocab_size=V, **FIELDS[request.param]).save_pretrained(
        path, safe_serialization=True)
    return request.param, path


def test_fp32_parity_greedy_and_cuda_graphs_on_off(checkpoint):
    model_type, checkpoint = checkpoint
    prompts, ref = _prompts(), registry.load_model(str(checkpoint), dtype=torch.float32).cuda().eval()
    runs = {}
    for eager in (False, True):
        llm = _serve(checkpoint, "float32", enforce_eager=eager)
        try:
            mode = llm.llm_engine.vllm_config.compilation_config.cudagraph_mode
            assert (mode.name == "NONE") == eager, mode
            runs[eager] = _generate(llm, prompts)
        finally:
            shutdown_engine(llm)
    for p, (gen, lp), (gen_eager, lp_eager) in zip(prompts, runs[False], runs[True]):
        ours, greedy = _ours(ref, p, gen)
        err = float(np.abs(ours - lp).max())
        print(f"{model_type} fp32 prompt {len(p)}: max |dlogp| {err:.2e}, graphs on/off "
              f"{float(np.abs(lp - lp_eager).max()):.2e}")
        assert gen == greedy and err <= FP32_ATOL
        assert gen == gen_eager and np.abs(lp - lp_eager).max() <= FP32_ATOL


def test_bf16_within_our_noise_floor(checkpoint):
    model_type, checkpoint = checkpoint
    ref = registry.load_model(str(checkpoint), dtype=torch.float32).cuda().eval()
    ours_bf16 = registry.load_model(str(checkpoint), dtype=torch.bfloat16).cuda().eval()
    llm = _serve(checkpoint, "bfloat16")
    try:
        got = _generate(llm, _prompts())
    finally:
        shutdown_engine(llm)
    d_vllm, d_ours = [], []
    for p, (gen, lp) in zip(_prompts(), got):
        r, _ = _ours(ref, p, gen)
        mine, _ = _ours(ours_bf16, p, gen)
        d_vllm.append(np.abs(lp - r))
        d_ours.append(np.abs(mine - r))
    d_vllm, d_ours = np.concatenate(d_vllm), np.concatenate(d_ours)
    print(f"{model_type} bf16: vLLM max {d_vllm.max():.3f} mean {d_vllm.mean():.4f}; "
          f"ours max {d_ours.max():.3f} mean {d_ours.mean():.4f}")
    assert d_vllm.max() <= 2 * d_ours.max() and d_vllm.mean() <= 2 * d_ours.mean()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallel size 2 needs two GPUs")
def test_tensor_parallel_2_equals_1(checkpoint):
    _, checkpoint = checkpoint
    prompts, runs = _prompts(), {}
    for tp in (1, 2):
        llm = _serve(checkpoint, "float32", tensor_parallel_size=tp)
        try:
            runs[tp] = _generate(llm, prompts)
        finally:
            shutdown_engine(llm)
    for (gen1, lp1), (gen2, lp2) in zip(runs[1], runs[2]):
        assert gen1 == gen2 and np.abs(lp1 - lp2).max() <= FP32_ATOL


def test_rollout_engine_on_cuda(checkpoint):
    """rollout.backend=vllm on CUDA (CUDA graphs on, prefix caching, seeded requests): behaviour
    log-probs equal our model's log_softmax(logits / T) of a re-encode."""
    from reencode_reference import reencode_logprobs

    from refine_ray.config import DataConfig, ExperimentConfig, ModelConfig, RefineConfig
    from refine_ray.serving.vllm_rollout import VLLMRollout
    from refine_ray.transport.batches import DocBatch, ScoredBatch

    model_type, checkpoint = checkpoint
    G, K, T = 3, 4, 0.7
    cfg = ExperimentConfig(model=ModelConfig(type=model_type, path=str(checkpoint)),
                           refine=RefineConfig(samples_per_prefix=G, response_length=K, temperature=T,
                                               prefix_sharing=False), data=DataConfig(max_length=256))
    rng = np.random.default_rng(1)
    docs, cuts = [rng.integers(0, V, 200), rng.integers(0, V, 150)], np.array([[40, 170], [7, 120]])
    batch = ScoredBatch(docs=DocBatch.from_lists([0, 1], docs), cuts=cuts, gt_ids=np.zeros((4, K), np.int64),
                        gt_hidden=np.zeros((4, K, 1), np.float32), cut_entropy=np.zeros(4, np.float32), step=0)
    engine = VLLMRollout(cfg.model, cfg.refine, cfg.data.max_length, V, cfg.train.seed)
    try:
        assert engine.llm.llm_engine.vllm_config.compilation_config.cudagraph_mode.name != "NONE"
        out = engine.generate(batch, version=0)
    finally:
        engine.close()
    ref = registry.load_model(str(checkpoint), dtype=torch.float32).eval()
    want = reencode_logprobs(ref, batch, out.tokens, G, K, T)
    assert np.abs(out.logprobs - want).max() <= FP32_ATOL

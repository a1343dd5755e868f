"""Language models for refine_ray, in fla's tiers: ops -> layers -> model families -> registry.

  ops/        kernels' pure-PyTorch references and the dispatch to fla's Triton kernels on CUDA
              (delta rule, gated delta rule, short conv, norms, LaCT's fast-weight scan)
  layers/     one file per token mixer (DeltaNet, GatedDeltaNet, LaCT, attention) and the
              pieces every block shares (RMSNorm, SwiGLU MLP, short conv, padding check)
  deltanet/   DeltaNet and GatedDeltaNet (one class hierarchy, fla's config classes)
  lact/       LaCT (large-chunk test-time training)
  llama/      softmax attention with a KV-cache state (the architecture vLLM serves)
  registry.py the one list of model families: classes, tiny presets, properties
  base.py     the segment contract (ModelState, SegmentOutput, FastWeightLM), offset_free_state
  dtypes.py   the compute-dtype rule (bfloat16 only on CUDA)
  generation.py  prefill, sampling and greedy generation on any family
  hf_generate.py transformers' ``generate`` on our classes (the recurrent state as the HF cache)
  auto.py        ``import refine_ray.models.auto``: transformers' Auto classes load our classes

Light on import: every name below loads its module on first access, so
``refine_ray.models.registry`` can be read without importing torch or fla.
"""
import importlib

_LAZY = {
    "FastWeightLM": "base", "ModelState": "base", "SegmentOutput": "base", "offset_free_state": "base",
    "DeltaNetForCausalLM": "deltanet", "GatedDeltaNetForCausalLM": "deltanet",
    "DeltaNetModel": "deltanet", "GatedDeltaNetModel": "deltanet",
    "build_model": "registry", "load_model": "registry", "tiny_config": "registry", "family": "registry",
    "MODEL_TYPES": "registry",
    "compute_dtype": "dtypes",
    "prefill": "generation", "sample_continuations": "generation", "generate": "generation",
    "Continuations": "generation",
}


def __getattr__(name):
    """Load ``name`` from its module on first access (see ``_LAZY``)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)

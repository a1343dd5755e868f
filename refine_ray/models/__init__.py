"""Fast-weight language models for refine_ray.

Light on import: ``base`` (ModelState, SegmentOutput, FastWeightLM) is plain torch; the
model classes (which import fla for its config classes) load lazily on first access.
"""
from .base import FastWeightLM, ModelState, SegmentOutput

_LAZY = {
    "DeltaNetForCausalLM": "deltanet", "GatedDeltaNetForCausalLM": "deltanet",
    "DeltaNetModel": "deltanet", "GatedDeltaNetModel": "deltanet",
    "build_model": "registry", "load_model": "registry", "tiny_config": "registry",
    "SUPPORTED_TYPES": "registry",
    "prefill": "generation", "sample_continuations": "generation", "generate": "generation",
    "Continuations": "generation",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FastWeightLM", "ModelState", "SegmentOutput", *_LAZY]

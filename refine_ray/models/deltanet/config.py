"""The DeltaNet family's configs: fla's own config classes, the options we cover, the tiny presets.

``DeltaNetConfig`` / ``GatedDeltaNetConfig`` are fla 0.6.0's classes themselves (not copies),
so a checkpoint we save loads with fla's ``AutoModelForCausalLM`` and vice versa.
"""
from __future__ import annotations

from fla.models import DeltaNetConfig, GatedDeltaNetConfig

# The tiny presets' common fields: seconds on a CPU (hidden 64, 2 layers, 2 heads).
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, intermediate_size=128, conv_size=4,
             use_short_conv=True, norm_eps=1e-6, tie_word_embeddings=False)


def check_supported(config) -> None:
    """Raise a one-line NotImplementedError naming a config option this implementation does not cover
    (hybrid attention layers, attention residuals, attn_mode other than chunk/fused_recurrent,
    hidden_act other than swish, use_l2warp)."""
    if getattr(config, "attn", None):
        raise NotImplementedError("unsupported config option attn (hybrid softmax-attention layers)")
    if getattr(config, "attnres_block_size", None) is not None:
        raise NotImplementedError("unsupported config option attnres_block_size (attention residuals)")
    if getattr(config, "attn_mode", "chunk") not in ("chunk", "fused_recurrent"):
        raise NotImplementedError(f"unsupported config option attn_mode={config.attn_mode!r}")
    if getattr(config, "hidden_act", "swish") != "swish":
        raise NotImplementedError(f"unsupported config option hidden_act={config.hidden_act!r}")
    if getattr(config, "use_l2warp", False):
        raise NotImplementedError("unsupported config option use_l2warp")


def _tiny_fields(overrides: dict) -> dict:
    """The common tiny fields; ``intermediate_size`` follows fla's rule (~8/3 hidden, rounded up
    to 256) when only ``hidden_size`` is overridden."""
    kw = dict(_TINY)
    if "hidden_size" in overrides and "intermediate_size" not in overrides:
        kw["intermediate_size"] = None
    return kw


def tiny_delta_net_config(vocab_size: int, **overrides) -> DeltaNetConfig:
    """Tiny DeltaNet preset (hidden 64, 2 layers, 2 heads, MLP 128, short conv 4, l2 qk norm,
    silu qk activation, output norm, no gate); ``overrides`` are DeltaNetConfig fields."""
    kw = dict(_tiny_fields(overrides), vocab_size=vocab_size, qk_norm="l2", qk_activation="silu", use_beta=True,
              use_gate=False, use_output_norm=True, expand_k=1.0, expand_v=1.0)
    kw.update(overrides)
    return DeltaNetConfig(**kw)


def tiny_gated_deltanet_config(vocab_size: int, **overrides) -> GatedDeltaNetConfig:
    """Tiny GatedDeltaNet preset (hidden 64, 2 layers, 2 heads of dim 32, expand_v 1, output gate);
    ``head_dim`` follows hidden_size // num_heads when either is overridden and it is not."""
    kw = dict(_tiny_fields(overrides), vocab_size=vocab_size, head_dim=32, expand_v=1.0, use_gate=True)
    if ("hidden_size" in overrides or "num_heads" in overrides) and "head_dim" not in overrides:
        overrides["head_dim"] = overrides.get("hidden_size", kw["hidden_size"]) // overrides.get("num_heads", kw["num_heads"])
    kw.update(overrides)
    return GatedDeltaNetConfig(**kw)

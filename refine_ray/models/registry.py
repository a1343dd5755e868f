"""Model registry: build a random model from config fields, load a local HF checkpoint.

Supported model types: 'delta_net', 'gated_deltanet' (ours, on fla's config classes),
'lact' (refine_ray.models.lact, imported lazily; a clear error if it is absent) and 'llama'
(refine_ray.models.attention: softmax attention with a KV-cache state, for the vLLM backend).
Deliberate decisions:
  * ``build_model`` starts from the :func:`tiny_config` preset and overrides it with the
    given fields, so ``build_model(t, vocab_size=V)`` is a tiny model and full configs are
    built by passing every field. ``seed=None`` uses the global RNG (callers that seed
    themselves); an int seeds a forked RNG, leaving the global one untouched.
  * For 'gated_deltanet', ``head_dim`` defaults to hidden_size // num_heads when either
    is overridden; for 'lact', ``num_heads`` is accepted as an alias of ``num_attn_heads``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

SUPPORTED_TYPES = ("delta_net", "gated_deltanet", "lact", "llama")


def _classes(model_type: str):
    """(config class, causal-LM class) for a model type; imports lazily."""
    if model_type == "delta_net":
        from .deltanet import DeltaNetConfig, DeltaNetForCausalLM
        return DeltaNetConfig, DeltaNetForCausalLM
    if model_type == "gated_deltanet":
        from .deltanet import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
        return GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    if model_type == "lact":
        try:
            from .lact import LaCTConfig, LaCTForCausalLM
        except ImportError as e:
            raise ImportError(f"model_type 'lact' needs refine_ray.models.lact (LaCTConfig, LaCTForCausalLM): {e}") from e
        return LaCTConfig, LaCTForCausalLM
    if model_type == "llama":
        from .attention import LlamaConfig, LlamaForCausalLM
        return LlamaConfig, LlamaForCausalLM
    raise ValueError(f"unknown model_type {model_type!r}; supported: {', '.join(SUPPORTED_TYPES)}")


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """A seconds-on-CPU preset (hidden 64, 2 layers, 2 heads) with the tokenizer's vocab size."""
    config_cls, _ = _classes(model_type)
    if model_type == "lact":
        if "num_heads" in overrides and "num_attn_heads" not in overrides:
            overrides["num_attn_heads"] = overrides.pop("num_heads")
        overrides.pop("num_heads", None)
        return config_cls.tiny(vocab_size=vocab_size, **overrides)
    if model_type == "llama":
        from .attention import tiny_config as tiny_llama
        return tiny_llama(vocab_size, **overrides)
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_heads=2,
                  intermediate_size=128, conv_size=4, use_short_conv=True, norm_eps=1e-6,
                  tie_word_embeddings=False)
    if model_type == "delta_net":
        kw = dict(common, qk_norm="l2", qk_activation="silu", use_beta=True, use_gate=False,
                  use_output_norm=True, expand_k=1.0, expand_v=1.0)
    else:
        kw = dict(common, head_dim=32, expand_v=1.0, use_gate=True)
        if ("hidden_size" in overrides or "num_heads" in overrides) and "head_dim" not in overrides:
            h = overrides.get("hidden_size", kw["hidden_size"])
            overrides["head_dim"] = h // overrides.get("num_heads", kw["num_heads"])
    if "hidden_size" in overrides and "intermediate_size" not in overrides:
        kw["intermediate_size"] = None  # fla's rule: ~8/3 * hidden, rounded up to 256
    kw.update(overrides)
    return config_cls(**kw)


def build_model(model_type: str, seed: Optional[int] = None, **config_fields):
    """A randomly initialised model of ``model_type``; ``config_fields`` override the tiny preset."""
    vocab_size = config_fields.pop("vocab_size", 256)
    config = tiny_config(model_type, vocab_size, **config_fields)
    _, model_cls = _classes(model_type)
    if seed is None:
        return model_cls(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config)


def model_type_of(path: str) -> str:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {path!r} (expected a local HF model directory)")
    with open(cfg_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type is None and os.path.isdir(os.path.join(path, "checkpoints")):
        raise ValueError(f"{path!r} is a training run, not a model: export it first "
                         f"(refine-ray export --from {path} --out {os.path.join(path, 'hf')})")
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(f"{cfg_path}: unknown model_type {model_type!r}; supported: {', '.join(SUPPORTED_TYPES)}")
    return model_type


def load_model(path: str, dtype: Optional[torch.dtype] = None, device=None):
    """Load a local HF directory (config.json + weights) into our class for its model_type.

    ``.bin`` weights go through transformers' weights-only ``torch.load``: a file that pickles
    anything but tensors is refused, never executed.

    Raises:
        ValueError: one line, for a weights file that pickles code or unknown objects.
    """
    import pickle

    model_type = model_type_of(path)
    _, model_cls = _classes(model_type)
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        model = model_cls.from_pretrained(path, local_files_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        import re

        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(f"'{path}': refusing to load weights that pickle code or unknown objects "
                         f"({unsafe.group(1) if unsafe else type(e).__name__})") from None
    if device is not None:
        model = model.to(device)
    return model

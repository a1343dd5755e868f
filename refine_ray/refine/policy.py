"""Build the policy (and the reference model) from the ``model`` config section (weight sync lives in
refine_ray.transport.weight_sync)."""
from __future__ import annotations

import torch

from refine_ray.config import ModelConfig
from refine_ray.models import registry
from refine_ray.models.base import enable_checkpointing
from refine_ray.models.dtypes import compute_dtype


def build_policy(cfg: ModelConfig, vocab_size: int, device: torch.device | str | None = None):
    """The policy: a local HF checkpoint (``cfg.path``) or a random model shaped by ``cfg`` (seeded by
    ``cfg.seed``, so every role and learner rank builds the same weights), in the compute dtype
    (``models.dtypes.compute_dtype``) on ``device`` (default: CUDA if any), with per-block activation
    checkpointing when ``cfg.gradient_checkpointing`` (it acts only in training mode under grad, so the
    inference roles that build the same policy run it as is).
    Raises ValueError when the checkpoint's vocabulary is smaller than the tokenizer's, or for
    ``bfloat16`` without CUDA (one line, from ``compute_dtype``)."""
    dtype = compute_dtype(cfg.dtype)          # first: a bf16 request on CPU stops before any loading
    if cfg.path is not None:
        model = registry.load_model(cfg.path)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"model.path: '{cfg.path}' has vocab_size={model.config.vocab_size} but the "
                             f"tokenizer has {vocab_size} tokens (tokenizer.path must match the model)")
    else:
        model = registry.build_model(cfg.type, seed=cfg.seed, vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                                     num_hidden_layers=cfg.num_hidden_layers, num_heads=cfg.num_heads)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device=device, dtype=dtype)

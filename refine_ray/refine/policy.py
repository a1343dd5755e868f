"""Build the policy (and reference) model from the ``model`` config section."""
from __future__ import annotations

import torch

from refine_ray.config import ModelConfig
from refine_ray.models import registry


def build_policy(cfg: ModelConfig, vocab_size: int, device: torch.device | str | None = None):
    """A local HF checkpoint (``cfg.path``) or a random model shaped by ``cfg`` (seeded)."""
    if cfg.path is not None:
        model = registry.load_model(cfg.path)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"model.path: '{cfg.path}' has vocab_size={model.config.vocab_size} but the "
                             f"tokenizer has {vocab_size} tokens (tokenizer.path must match the model)")
    else:
        model = registry.build_model(cfg.type, seed=cfg.seed, vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                                     num_hidden_layers=cfg.num_hidden_layers, num_heads=cfg.num_heads)
    dtype = torch.bfloat16 if (cfg.dtype == "bfloat16" and torch.cuda.is_available()) else torch.float32
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device=device, dtype=dtype)


def load_numpy_weights(model, weights: dict) -> None:
    """Load a ``{name: ndarray}`` state dict (weight sync) into ``model`` in place."""
    # state_dict: the persistent tensors, as the learner publishes them (non-persistent
    # buffers such as rotary inv_freq are derived from the config and never travel)
    params = model.state_dict(keep_vars=True)
    missing = set(params) - set(weights)
    if missing:
        raise KeyError(f"weight sync: {len(missing)} tensors missing, e.g. {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, t in params.items():
            t.copy_(torch.from_numpy(weights[name]).to(device=t.device, dtype=t.dtype))

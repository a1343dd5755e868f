"""The compute dtype rule, in one place: bfloat16 only when asked for and on a GPU.

Every part that turns ``model.dtype`` into a torch dtype (the policy, the vLLM engine,
weight sync, the DeepSpeed bf16 switch, test-time training's autocast) calls
:func:`compute_dtype`. Deliberate: on CPU a ``bfloat16`` request runs in float32 (CPU
bf16 matmuls are slow and our pure-PyTorch kernels are written for fp32), so the same
config runs unchanged on a laptop and on a GPU node.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

DTYPES = ("float32", "bfloat16")


def compute_dtype(name: str, device: Optional[Union[torch.device, str]] = None) -> torch.dtype:
    """``torch.bfloat16`` for ``name == "bfloat16"`` on CUDA, else ``torch.float32``.

    Args:
        name: ``model.dtype`` of the experiment config ('float32' or 'bfloat16').
        device: the device the model runs on; None means "this process's GPU if it has one"
            (``torch.cuda.is_available()``).
    Raises:
        ValueError: ``name`` is not one of :data:`DTYPES`.
    """
    if name not in DTYPES:
        raise ValueError(f"model.dtype: {name!r} is not one of {', '.join(DTYPES)}")
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return torch.bfloat16 if (name == "bfloat16" and on_gpu) else torch.float32

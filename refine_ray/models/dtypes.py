"""The compute dtype rule, in one place: ``bfloat16`` runs on CUDA GPUs, nowhere else.

Every part that turns ``model.dtype`` into a torch dtype (the policy, the vLLM engine,
weight sync, the DeepSpeed bf16 switch, test-time training's autocast) calls
:func:`compute_dtype`, and the entry points check it before anything starts (preflight for
training on a local cluster, ``refine-ray eval``). Deliberate: a ``bfloat16`` request where
there is no GPU stops with one line instead of running in another dtype. CPU bf16 matmuls are
slow, our pure-PyTorch kernels are written for fp32, and a silent fp32 run would publish
numbers for a dtype that never ran (the defect of issue 23 point 5).

:func:`non_finite_tensor` is the one check that loaded weights hold no NaN or inf (preflight for
training, ``refine-ray eval`` for the model it evaluates).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

DTYPES = ("float32", "bfloat16")


def compute_dtype(name: str, device: Optional[Union[torch.device, str]] = None) -> torch.dtype:
    """``torch.float32`` for ``"float32"``; ``torch.bfloat16`` for ``"bfloat16"`` on a CUDA device.

    Args:
        name: ``model.dtype`` of the experiment config ('float32' or 'bfloat16').
        device: the device the model runs on; None means "this process's GPU if it has one"
            (``torch.cuda.is_available()``).
    Raises:
        ValueError: one line, when ``name`` is not one of :data:`DTYPES`, or is ``bfloat16``
            and ``device`` is not CUDA (None: this process sees no CUDA GPU).
    """
    if name not in DTYPES:
        raise ValueError(f"model.dtype: {name!r} is not one of {', '.join(DTYPES)}")
    if name == "float32":
        return torch.float32
    if device is None and not torch.cuda.is_available():
        raise ValueError("model.dtype: bfloat16 needs a CUDA GPU and none is visible here "
                         "(use model.dtype=float32 on CPU)")
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"model.dtype: bfloat16 needs a CUDA GPU but this model runs on {torch.device(device)} "
                         f"(use model.dtype=float32 on CPU)")
    return torch.bfloat16


def check_roles_dtype(name: str, gpu_shares: dict[str, float], local_cluster: bool) -> None:
    """Before a job starts: every role that computes with the model can run ``name`` there.

    Args:
        name: ``model.dtype``.
        gpu_shares: ``{config key: GPUs per actor}`` of the roles that run the model; a share of
            0 puts an actor on CPU (Ray hides every GPU from it).
        local_cluster: the job starts its own Ray cluster on this machine, so its actors see
            this machine's GPUs (logical ``system.num_gpus`` on a CPU machine are not CUDA).
    Raises:
        ValueError: one line naming the field, for ``bfloat16`` where a role would run on CPU.
    """
    if name != "bfloat16":
        return
    if local_cluster and not torch.cuda.is_available():
        raise ValueError("model.dtype: bfloat16 needs CUDA GPUs and this machine has none; the local cluster's "
                         "roles would run on CPU (use model.dtype=float32 on CPU)")
    for key, share in gpu_shares.items():
        if share <= 0:
            raise ValueError(f"{key}: {share:g} puts that role on CPU, but model.dtype=bfloat16 needs a CUDA GPU "
                             f"(give it a GPU share or use model.dtype=float32)")


def non_finite_tensor(items) -> Optional[tuple[str, int, int]]:
    """(name, non-finite count, size) of the first floating tensor of ``(name, tensor)`` items that
    holds a NaN or inf, else None.

    A NaN or inf element makes the sum non-finite, so a finite sum clears the tensor in one
    memory-bound pass (on this CPU ~20x faster than ``isfinite``); elements are counted only
    when the sum is not finite (so a float16 sum that merely overflowed is cleared too)."""
    for key, t in items:
        if torch.is_tensor(t) and t.is_floating_point():
            bad = 0 if torch.isfinite(t.sum()) else int((~torch.isfinite(t)).sum())
            if bad:
                return key, bad, t.numel()
    return None

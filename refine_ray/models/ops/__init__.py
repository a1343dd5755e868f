"""Pure-PyTorch fast-weight ops plus run-time dispatch to fla's Triton kernels on CUDA.

Reference ops (always PyTorch): ``chunk_delta_rule``, ``recurrent_delta_rule``,
``chunk_gated_delta_rule``, ``recurrent_gated_delta_rule``, ``causal_conv1d``,
``rms_norm``, ``rms_norm_gated``, ``l2norm``, ``swiglu``.
Dispatching ops used by the models live in :mod:`.dispatch`.
"""
from .conv import causal_conv1d
from .delta_rule import (chunk_delta_rule, chunk_gated_delta_rule, recurrent_delta_rule,
                         recurrent_gated_delta_rule)
from .dispatch import fla_kernels_available, kernel_backend
from .pointwise import elu_p1, l2norm, rms_norm, rms_norm_gated, sum_norm, swiglu

__all__ = [
    "causal_conv1d", "chunk_delta_rule", "chunk_gated_delta_rule", "recurrent_delta_rule",
    "recurrent_gated_delta_rule", "fla_kernels_available", "kernel_backend", "elu_p1", "l2norm",
    "rms_norm", "rms_norm_gated", "sum_norm", "swiglu",
]

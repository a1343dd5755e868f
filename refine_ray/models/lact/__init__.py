"""The LaCT family (large-chunk test-time training; Zhang et al. 2025, "Test-Time Training Done Right").

Public API: ``LaCTConfig``, ``tiny_lact_config`` (the registry's tiny preset),
``LaCTForCausalLM`` (HF ``forward`` + ``forward_segment``), ``LaCTModel``. The mixer is
:mod:`refine_ray.models.layers.lact`, its fast-weight math :mod:`refine_ray.models.ops.fast_weight`.
Importing this package registers model_type ``'lact'`` with transformers' AutoConfig /
AutoModel / AutoModelForCausalLM.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import LaCTConfig, tiny_lact_config
from .modeling import LaCTForCausalLM, LaCTModel, LaCTPreTrainedModel

AutoConfig.register(LaCTConfig.model_type, LaCTConfig, exist_ok=True)
AutoModel.register(LaCTConfig, LaCTModel, exist_ok=True)
AutoModelForCausalLM.register(LaCTConfig, LaCTForCausalLM, exist_ok=True)

__all__ = ["LaCTConfig", "LaCTForCausalLM", "LaCTModel", "LaCTPreTrainedModel", "tiny_lact_config"]

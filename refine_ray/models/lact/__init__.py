"""LaCT (large-chunk test-time training) language model for refine_ray.

Public API: ``LaCTConfig`` (``LaCTConfig.tiny()`` for tests), ``LaCTForCausalLM``
(HF ``forward`` + ``forward_segment``), ``LaCTModel``. Importing this package
registers model_type ``'lact'`` with transformers' AutoConfig / AutoModel /
AutoModelForCausalLM.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import LaCTConfig
from .modeling import LaCTForCausalLM, LaCTModel, LaCTPreTrainedModel

AutoConfig.register(LaCTConfig.model_type, LaCTConfig, exist_ok=True)
AutoModel.register(LaCTConfig, LaCTModel, exist_ok=True)
AutoModelForCausalLM.register(LaCTConfig, LaCTForCausalLM, exist_ok=True)

__all__ = ["LaCTConfig", "LaCTForCausalLM", "LaCTModel", "LaCTPreTrainedModel"]

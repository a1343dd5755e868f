"""The DeltaNet family: DeltaNet and GatedDeltaNet (one folder: they share every class but the mixer).

Config classes are fla's own; parameter names equal fla 0.6.0's ``fla.models`` classes.
Registry entries: 'delta_net', 'gated_deltanet' (:mod:`refine_ray.models.registry`).
"""
from .config import (DeltaNetConfig, GatedDeltaNetConfig, check_supported, tiny_delta_net_config,
                     tiny_gated_deltanet_config)
from .modeling import (DeltaNetForCausalLM, DeltaNetModel, DeltaNetPreTrainedModel, GatedDeltaNetForCausalLM,
                       GatedDeltaNetModel, GatedDeltaNetPreTrainedModel)

__all__ = ["DeltaNetConfig", "GatedDeltaNetConfig", "check_supported", "tiny_delta_net_config",
           "tiny_gated_deltanet_config", "DeltaNetForCausalLM", "DeltaNetModel", "DeltaNetPreTrainedModel",
           "GatedDeltaNetForCausalLM", "GatedDeltaNetModel", "GatedDeltaNetPreTrainedModel"]

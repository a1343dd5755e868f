"""Versioned weight publication from the learner to the inference roles, one interface, backends side by side.

* :mod:`.base`: the tensor set every backend moves (parameters + persistent buffers),
  :class:`Publication` and the :class:`WeightSync` interface.
* :mod:`.object_store`: ``system.weight_sync=object_store`` (default; any hardware).
* :mod:`.collective`: ``system.weight_sync=collective`` (bucketed broadcast, gloo / NCCL).

The vLLM rollout engine receives the object-store dict (``{name: ndarray}`` of the same
tensor set) and reloads it from a safetensors file (refine_ray.serving.vllm_rollout).
"""
from __future__ import annotations

from refine_ray.config import ModelConfig, SystemConfig
from refine_ray.system.weight_sync.base import Publication, WeightSync, weight_tensors
from refine_ray.system.weight_sync.collective import CollectiveWeightSync
from refine_ray.system.weight_sync.object_store import ObjectStoreWeightSync

__all__ = ["Publication", "WeightSync", "weight_tensors", "CollectiveWeightSync", "ObjectStoreWeightSync",
           "make_weight_sync"]


def make_weight_sync(system: SystemConfig, model: ModelConfig, learners: list) -> WeightSync:
    """The backend ``system.weight_sync`` names, sending from the learner rank actors ``learners``."""
    if system.weight_sync == "collective":
        return CollectiveWeightSync(learners, model.dtype, system.weight_bucket_mb, system.weight_sync_timeout_s)
    return ObjectStoreWeightSync(learners)

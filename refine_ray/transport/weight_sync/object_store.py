"""Weight sync through the Ray object store: send (learner), receive (inference actor), publish (driver).

The learner's rank 0 gathers the tensor set (:func:`base.weight_tensors`) as one
``{name: ndarray}`` dict; its return value lives in the object store, owned by the
driver, and every receiver fetches it from there (it never passes through the driver
process). The driver queues ``update_weights(version, ref)`` on every receiver. Works on
any hardware and needs no process group. The same dict is what the vLLM rollout engine
receives (``VLLMRollout.load_weights``: written as safetensors and reloaded in place).
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import ray
import torch

from refine_ray.system.weight_sync.base import Publication, WeightSync, gathered, weight_tensors


def gather_weights(module: torch.nn.Module, zero3: bool, rank: int) -> Optional[dict[str, np.ndarray]]:
    """Learner side: the tensor set as ``{name: ndarray}`` on rank 0, None on other ranks.

    Floating tensors travel as float32 (exact for float32 and bfloat16 weights), others in
    their own dtype. Under ZeRO-3 every rank must call this (each parameter's gather is a
    collective).
    """
    out = {}
    for name, t in weight_tensors(module):
        with gathered([t], zero3):
            if rank == 0:
                value = t.detach().float() if t.is_floating_point() else t.detach()
                out[name] = value.cpu().numpy().copy()
    return out if rank == 0 else None


def load_weights(module: torch.nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Receiver side: copy ``weights`` into ``module``'s tensor set in place (cast to each
    tensor's dtype and device).

    Raises:
        KeyError: ``weights`` lacks tensors of the set (a different architecture).
    """
    tensors = weight_tensors(module)
    missing = [n for n, _ in tensors if n not in weights]
    if missing:
        raise KeyError(f"weight sync: {len(missing)} tensors missing, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, t in tensors:
            t.copy_(torch.from_numpy(np.asarray(weights[name])).to(device=t.device, dtype=t.dtype))


class ObjectStoreWeightSync(WeightSync):
    """Driver side: one gather on the learner, one object-store dict, one update call per receiver."""

    def __init__(self, learners: list):
        """``learners``: the learner rank actors (every one takes part in a ZeRO-3 gather)."""
        self.learners = learners

    def publish(self, version: int, receivers: list) -> Publication:
        """Gather on the learner ranks (waits), then queue ``update_weights(version, ref)`` on every
        receiver; returns the update refs and the gathered dict's ref. Raises RayActorError when a
        learner rank is dead."""
        t0 = time.perf_counter()
        refs = [r.gather_weights.remote() for r in self.learners]
        ray.get(refs[1:])
        ray.wait([refs[0]], fetch_local=False)
        gather_s = time.perf_counter() - t0
        return Publication([a.update_weights.remote(version, refs[0]) for a in receivers], gather_s, refs[0])

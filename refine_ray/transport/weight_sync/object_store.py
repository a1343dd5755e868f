"""Weight sync through the Ray object store (``system.weight_sync=object_store``, the default).

Sender (learner rank): rank 0 gathers the tensor set (:func:`base.weight_tensors`) as one
``{name: ndarray}`` dict; the return value lives in the object store, owned by the driver.
Publisher (driver): queues ``receive_weights(version, ref)`` on every receiver, which
fetches the dict from the object store (it never passes through the driver process).
Receiver (inference actor): copies it into the module, or hands it to an engine that loads
it itself (``VLLMRollout.load_weights``: written as safetensors and reloaded in place).
Works on any hardware and needs no process group.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import ray
import torch

from refine_ray.transport.weight_sync.base import (Publication, WeightPublisher, WeightReceiver, WeightSender,
                                                   gather_tensor_set, weight_tensors)


def load_tensor_set(target, weights: dict[str, np.ndarray]) -> None:
    """Receiver side: copy ``weights`` into module ``target``'s tensor set in place (cast to each
    tensor's dtype and device); an engine that is not a module loads them itself (``target.load_weights``).

    Raises:
        KeyError: ``weights`` lacks tensors of the set (a different architecture).
    """
    if not isinstance(target, torch.nn.Module):
        target.load_weights(weights)
        return
    tensors = weight_tensors(target)
    missing = [n for n, _ in tensors if n not in weights]
    if missing:
        raise KeyError(f"weight sync: {len(missing)} tensors missing, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, t in tensors:
            t.copy_(torch.from_numpy(np.asarray(weights[name])).to(device=t.device, dtype=t.dtype))


class ObjectStoreSender(WeightSender):
    def send(self) -> Optional[dict[str, np.ndarray]]:
        """The tensor set as ``{name: ndarray}`` on rank 0, None elsewhere (every rank gathers under ZeRO-3)."""
        return gather_tensor_set(self.module, self.zero3, self.rank)


class ObjectStoreReceiver(WeightReceiver):
    def receive(self, target, payload: dict[str, np.ndarray]) -> None:
        """Load the gathered dict (Ray resolved the ref) into ``target``; KeyError for missing tensors."""
        load_tensor_set(target, payload)


class ObjectStorePublisher(WeightPublisher):
    """One gather on the learner, one object-store dict, one receive call per receiver."""

    def publish(self, version: int, receivers: list) -> Publication:
        """Gather on the learner ranks (waits), then queue ``receive_weights(version, ref)`` on every
        receiver; returns the receive refs and the gathered dict's ref. Raises RayActorError when a
        learner rank is dead."""
        t0 = time.perf_counter()
        refs = [r.send_weights.remote() for r in self.learners]
        ray.get(refs[1:])
        ray.wait([refs[0]], fetch_local=False)
        gather_s = time.perf_counter() - t0
        return Publication([a.receive_weights.remote(version, refs[0]) for a in receivers], gather_s, refs[0])

"""Versioned weight publication from the learner to the inference roles, backends side by side.

A backend is one file with its three parts (:mod:`.base`): the learner rank's sender, the
inference actor's receiver and the driver's publisher. :data:`BACKENDS` maps each
``system.weight_sync`` name to its parts; it is the one place a backend is chosen, so a new
backend is a new file and one line here.

* :mod:`.object_store`: ``object_store`` (default; any hardware).
* :mod:`.collective`: ``collective`` (bucketed broadcast, gloo / NCCL).

Every backend moves the same tensor set (:func:`.base.weight_tensors`).
"""
from __future__ import annotations

from typing import NamedTuple

from refine_ray.transport.weight_sync import collective, object_store
from refine_ray.transport.weight_sync.base import (Publication, WeightPublisher, WeightReceiver, WeightSender,
                                                   weight_tensors)

__all__ = ["BACKENDS", "Backend", "backend", "Publication", "WeightPublisher", "WeightReceiver", "WeightSender",
           "weight_tensors"]


class Backend(NamedTuple):
    """A weight-sync backend's three parts (classes)."""
    sender: type[WeightSender]
    receiver: type[WeightReceiver]
    publisher: type[WeightPublisher]


BACKENDS: dict[str, Backend] = {
    "object_store": Backend(object_store.ObjectStoreSender, object_store.ObjectStoreReceiver,
                            object_store.ObjectStorePublisher),
    "collective": Backend(collective.CollectiveSender, collective.CollectiveReceiver, collective.CollectivePublisher),
}


def backend(name: str) -> Backend:
    """The backend ``system.weight_sync`` names. Raises ValueError (one line) for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"system.weight_sync: {name!r} is not a weight-sync backend; expected one of "
                         f"{', '.join(BACKENDS)}")
    return BACKENDS[name]

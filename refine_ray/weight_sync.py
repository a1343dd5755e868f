"""Versioned weight publication from the learner to the inference roles.

The learner's rank 0 gathers the full weights after step v and publishes them
as version v. The object-store backend puts one ``{name: ndarray}`` dict into
the Ray object store (once, whatever the number of receivers) and queues an
``update_weights(v, ref)`` call on every inference actor. Ray runs an actor's
calls in order, so the switch happens between requests, never mid-sample.

``publish`` returns the update refs: sync mode waits for them; async mode lets
them land while the next rollout is already running and only checks them later.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray


@dataclass
class Publication:
    version: int
    weights_ref: object = None                    # the published weights (re-sent to replaced actors)
    acks: list = field(default_factory=list)     # refs of update_weights calls
    gather_s: float = 0.0                         # learner gather + ray.put


class ObjectStoreWeightSync:
    """Weights travel through the Ray object store (CPU and GPU; no NCCL group needed)."""

    def __init__(self, learner_ranks: list):
        self.learner_ranks = learner_ranks

    def publish(self, version: int, receivers: list) -> Publication:
        t0 = time.perf_counter()
        # Every rank must take part (ZeRO-3 gathers are collective); rank 0 returns the dict.
        # Its return value already lives in the object store and is owned by this driver:
        # receivers fetch it from there, it never travels through the driver process.
        refs = [r.full_state_dict.remote() for r in self.learner_ranks]
        ray.get(refs[1:])
        ray.wait([refs[0]], fetch_local=False)
        weights_ref = refs[0]
        gather_s = time.perf_counter() - t0
        acks = [actor.update_weights.remote(version, weights_ref) for actor in receivers]
        return Publication(version, weights_ref, acks, gather_s)

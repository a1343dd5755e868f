"""Versioned weight publication from the learner to the inference roles.

The learner's rank 0 gathers the full weights after step v and publishes them
as version v. The object-store backend puts one ``{name: ndarray}`` dict into
the Ray object store (once, whatever the number of receivers) and queues an
``update_weights(v, ref)`` call on every inference actor. Ray runs an actor's
calls in order, so the switch happens between requests, never mid-sample.

Two backends: :class:`ObjectStoreWeightSync` (default; any hardware) and
:class:`CollectiveWeightSync` (bucketed broadcast over gloo / NCCL).

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
        return Publication(version, acks, gather_s)


class CollectiveWeightSync:
    """Weights travel as bucketed broadcasts from learner rank 0 (gloo on CPU, NCCL on GPU).

    The group is (re)formed whenever the set of receivers changes (a replaced or
    elastic actor). A broadcast needs every member: a receiver busy with a request
    joins when it finishes, so the switch still happens between requests.
    """

    def __init__(self, learner_ranks: list, system_cfg, model_dtype: str):
        self.learner_ranks = learner_ranks
        self.cfg = system_cfg
        self.model_dtype = model_dtype
        self.members: list = []
        self.group_id = 0

    def _form(self, receivers: list) -> None:
        self.group_id += 1
        host, port = ray.get(self.learner_ranks[0].address.remote())
        world = len(receivers) + 1
        joins = [self.learner_ranks[0].join_weight_group.remote(host, port, world, self.group_id)]
        joins += [a.join_weight_group.remote(host, port, world, i + 1, self.group_id, self.cfg.weight_sync_timeout_s)
                  for i, a in enumerate(receivers)]
        ray.get(joins)
        self.members = [a._actor_id for a in receivers]

    def publish(self, version: int, receivers: list) -> Publication:
        t0 = time.perf_counter()
        if [a._actor_id for a in receivers] != self.members:
            self._form(receivers)
        sends = [r.broadcast_weights.remote(version) for r in self.learner_ranks]
        acks = [a.receive_weights.remote(version, self.model_dtype, self.cfg.weight_bucket_mb) for a in receivers]
        return Publication(version, acks + sends, time.perf_counter() - t0)

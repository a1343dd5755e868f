"""Weight sync as a bucketed broadcast over a process group of its own (gloo on CPU, NCCL on GPU).

Learner rank 0 and every inference actor that holds policy weights form a group (rank 0
= the learner), built directly from a TCPStore so it never touches DeepSpeed's default
process group (the same idea as verl's and OpenRLHF's NCCL weight-update group). The
tensor set (:func:`base.weight_tensors`) travels in flat buckets of ``bucket_mb``: one
collective per bucket instead of one per tensor, and no more than one bucket of extra
memory on either side. Both sides walk the same architecture's tensor set in the same
order, so only the buckets travel. The sender (learner ranks), the receiver (inference
actors) and the driver's publisher, which forms the group, live here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import ray
import torch
import torch.distributed as dist

from refine_ray.transport.weight_sync.base import (Publication, WeightPublisher, WeightReceiver, WeightSender, full_numel,
                                                   gathered, weight_tensors, wire_dtype)


def bucket_plan(numels: list[int], dtypes: list[torch.dtype], bucket_mb: float) -> list[list[int]]:
    """Consecutive tensor indices per bucket: at most ``bucket_mb`` MiB each (a larger tensor gets
    its own bucket) and one wire dtype per bucket."""
    buckets: list[list[int]] = [[]]
    size = 0
    for i, (n, dtype) in enumerate(zip(numels, dtypes)):
        limit = max(1, int(bucket_mb * 2**20 / torch.empty((), dtype=dtype).element_size()))
        if buckets[-1] and (size + n > limit or dtypes[buckets[-1][0]] != dtype):
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += n
    return [b for b in buckets if b]


def _plan(tensors: list[torch.Tensor], model_dtype: str, bucket_mb: float) -> tuple[list, list[list[int]]]:
    dtypes = [wire_dtype(t, model_dtype) for t in tensors]
    return dtypes, bucket_plan([full_numel(t) for t in tensors], dtypes, bucket_mb)


class WeightGroup:
    """One member of a weight-broadcast group: rank 0 sends, everyone else receives.

    Raises ``torch.distributed.DistStoreError`` (or a gloo timeout) when the other members
    do not join within ``timeout_s`` seconds.
    """

    def __init__(self, host: str, port: int, world: int, rank: int, group_id: int, timeout_s: float = 120.0):
        """Rendezvous at ``host:port`` (rank 0 hosts the TCPStore) as ``rank`` of ``world``; keys are
        prefixed by ``group_id`` so a re-formed group never meets an old one's keys."""
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world, rank == 0, timeout, wait_for_workers=False)
        store = dist.PrefixStore(f"refine-weights-{group_id}", store)
        on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        if on_gpu:
            self.pg = dist.ProcessGroupNCCL(store, rank, world)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world, timeout)
        self._store = store   # keep the store alive as long as the group

    def broadcast(self, flat: torch.Tensor) -> None:
        """Broadcast ``flat`` (1-D, on ``self.device``) from rank 0 to every member, in place."""
        self.pg.broadcast(flat, 0).wait()


def broadcast_tensor_set(module: torch.nn.Module, group: WeightGroup | None, zero3: bool, model_dtype: str,
                 bucket_mb: float) -> int:
    """Learner side: broadcast the tensor set bucket by bucket; returns the bytes sent.

    Every learner rank calls this (under ZeRO-3 each bucket's gather is a collective);
    only rank 0 holds ``group`` and sends, the others pass ``group=None`` and only gather.
    """
    tensors = [t for _, t in weight_tensors(module)]
    dtypes, plan = _plan(tensors, model_dtype, bucket_mb)
    sent = 0
    for idx in plan:
        bucket = [tensors[i] for i in idx]
        with gathered(bucket, zero3):
            if group is None:
                continue
            flat = torch.cat([t.detach().to(group.device, dtypes[idx[0]]).reshape(-1) for t in bucket])
        group.broadcast(flat)
        sent += flat.numel() * flat.element_size()
    return sent


def receive_tensor_set(module: torch.nn.Module, group: WeightGroup, model_dtype: str, bucket_mb: float) -> None:
    """Receiver side: receive the buckets into ``module``'s tensor set in place (cast to each
    tensor's dtype). ``model_dtype`` and ``bucket_mb`` must be the sender's."""
    tensors = [t for _, t in weight_tensors(module)]
    dtypes, plan = _plan(tensors, model_dtype, bucket_mb)
    for idx in plan:
        bucket = [tensors[i] for i in idx]
        flat = torch.empty(sum(t.numel() for t in bucket), dtype=dtypes[idx[0]], device=group.device)
        group.broadcast(flat)
        offset = 0
        with torch.no_grad():
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


@dataclass(frozen=True)
class GroupAddress:
    """Where a broadcast group meets: learner rank 0's ``host:port`` (it hosts the TCPStore),
    ``world`` members, ``group_id`` (a re-formed group never meets an old one's keys) and the
    join ``timeout_s``."""
    host: str
    port: int
    world: int
    group_id: int
    timeout_s: float


class CollectiveSender(WeightSender):
    """Learner rank side: rank 0 joins the group as its member 0 and broadcasts; the other ranks
    only take part in the ZeRO-3 gathers."""

    group: WeightGroup | None = None

    def connect(self, group: GroupAddress) -> None:
        if self.rank == 0:
            self.group = WeightGroup(group.host, group.port, group.world, 0, group.group_id, group.timeout_s)

    def send(self) -> int:
        """Broadcast the tensor set; returns the bytes sent (0 on ranks other than 0)."""
        return broadcast_tensor_set(self.module, self.group, self.zero3, self.model_dtype, self.system.weight_bucket_mb)


class CollectiveReceiver(WeightReceiver):
    group: WeightGroup | None = None

    def connect(self, group: GroupAddress, rank: int) -> None:
        self.group = WeightGroup(group.host, group.port, group.world, rank, group.group_id, group.timeout_s)

    def receive(self, target, payload=None) -> None:
        """Take part in one broadcast into module ``target``. Raises TypeError for an engine that
        holds its weights elsewhere (vLLM: the config refuses that pairing before the run)."""
        if not isinstance(target, torch.nn.Module):
            raise TypeError(f"system.weight_sync=collective cannot load into {type(target).__name__}")
        receive_tensor_set(target, self.group, self.model_dtype, self.system.weight_bucket_mb)


class CollectivePublisher(WeightPublisher):
    """Driver side: (re)forms the group when the receivers change, then starts one broadcast.

    The group is formed again whenever the set of receivers changes (a replaced or elastic
    actor). A broadcast needs every member: a receiver busy with a request joins when it
    finishes, so the switch still happens between requests.
    """

    members: Optional[list] = None
    group_id: int = 0

    def _form(self, receivers: list) -> None:
        self.group_id += 1
        host, port = ray.get(self.learners[0].address.remote())
        group = GroupAddress(host, port, len(receivers) + 1, self.group_id, self.system.weight_sync_timeout_s)
        ray.get([r.connect_weights.remote(group) for r in self.learners]
                + [a.connect_weights.remote(group, i + 1) for i, a in enumerate(receivers)])
        self.members = [a._actor_id for a in receivers]

    def publish(self, version: int, receivers: list) -> Publication:
        """Start the broadcast on every learner rank and the receive on every receiver; returns
        all their refs (the broadcast completes only when every member has taken part)."""
        t0 = time.perf_counter()
        if [a._actor_id for a in receivers] != self.members:
            self._form(receivers)
        sends = [r.send_weights.remote() for r in self.learners]
        acks = [a.receive_weights.remote(version, None) for a in receivers]
        return Publication(acks + sends, time.perf_counter() - t0)

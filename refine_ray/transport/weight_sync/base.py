"""What every weight-sync backend shares: the tensor set it moves, the wire dtype, the interface.

A backend is one file with its three parts: the learner rank's :class:`WeightSender`, the
inference actor's :class:`WeightReceiver` and the driver's :class:`WeightPublisher`, registered
under its ``system.weight_sync`` name in :data:`refine_ray.transport.weight_sync.BACKENDS`.

The tensor set is the same for every backend (object store, collective, and the vLLM
engine's file reload, which receives the object-store dict): the module's parameters
(``named_parameters()``: tied weights once, under their first name) followed by its
persistent buffers (those ``state_dict`` saves), both in module order. Non-persistent
buffers (e.g. rotary ``inv_freq``) are derived from the config on each side and never
travel. Sender and receiver build the same architecture, so walking this list on both
sides pairs the tensors without sending names.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import ray
import torch

from refine_ray.models.dtypes import compute_dtype


def weight_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor)]``: parameters, then persistent buffers, in module order.

    Under ZeRO-3 a parameter may be a partitioned placeholder: gather it (:func:`gathered`)
    before reading its values. Buffers are never partitioned.
    """
    out = list(module.named_parameters())
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, buf))
    return out


def full_numel(t: torch.Tensor) -> int:
    """A tensor's full element count, also when ZeRO-3 has partitioned it away (``ds_numel``)."""
    return int(getattr(t, "ds_numel", t.numel()))


def gathered(tensors: list[torch.Tensor], zero3: bool):
    """Context in which ZeRO-3-partitioned ``tensors`` hold their full values (a collective:
    every learner rank must enter it with the same list). A no-op without ZeRO-3."""
    params = [t for t in tensors if hasattr(t, "ds_id")]
    if not (zero3 and params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def gather_tensor_set(module: torch.nn.Module, zero3: bool, rank: int) -> Optional[dict[str, np.ndarray]]:
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


def wire_dtype(t: torch.Tensor, model_dtype: str) -> torch.dtype:
    """The dtype a tensor travels in: floating tensors in the inference dtype (bfloat16 only when
    the model runs in bfloat16 on a GPU, else float32); integer/bool buffers in their own dtype."""
    if not t.is_floating_point():
        return t.dtype
    return compute_dtype(model_dtype)


@dataclass
class Publication:
    """One publication of the learner's weights to the inference actors.

    ``acks``: object refs that resolve once each receiver (and, for collectives, each
    learner rank) has finished its part; sync mode waits on them, async mode lets them land
    while the next rollout runs. ``gather_s``: seconds the driver waited before the receivers
    could start (object store: until every learner rank finished its gather; collective: only
    forming the group, if needed, and issuing the calls, as the gather overlaps the broadcast).
    ``weights``: a payload a receiver can load without the sender, when the backend keeps one
    (the object store's dict ref; None for the collective, which keeps no copy): holding it
    keeps this version available, e.g. to redo work launched with it after a newer version.
    """

    acks: list = field(default_factory=list)
    gather_s: float = 0.0
    weights: Optional[ray.ObjectRef] = None


class WeightSender:
    """Learner side of a backend: one per learner rank, around that rank's module.

    Built by the learner rank (``roles.learner``) from ``system`` and ``model.dtype``; every
    rank calls :meth:`send` in lockstep (ZeRO-3 gathers are collectives)."""

    def __init__(self, module: torch.nn.Module, rank: int, zero3: bool, system, model_dtype: str):
        self.module, self.rank, self.zero3 = module, rank, zero3
        self.system, self.model_dtype = system, model_dtype

    def connect(self, group) -> None:
        """Join whatever the backend's publisher set up (its ``group``); nothing by default."""

    def send(self):
        """Send the tensor set; returns the backend's payload (what its publisher hands the receivers)."""
        raise NotImplementedError


class WeightReceiver:
    """Inference side of a backend: one per actor that holds policy weights (``roles.common``).

    ``target``: the module to load into, or an engine that loads a ``{name: ndarray}`` dict
    itself (``load_weights``: vLLM, whose weights live in its own processes)."""

    def __init__(self, system, model_dtype: str):
        self.system, self.model_dtype = system, model_dtype

    def connect(self, group, rank: int) -> None:
        """Join the publisher's ``group`` as member ``rank``; nothing by default."""

    def receive(self, target, payload) -> None:
        """Load one publication (``payload``: what the publisher passed) into ``target``."""
        raise NotImplementedError


class WeightPublisher:
    """Driver side of a backend: starts one publication from the learner rank actors to the
    receivers (actor handles with ``connect_weights``/``send_weights`` on the learner ranks,
    ``connect_weights``/``receive_weights`` on the inference actors).

    Ray runs an actor's calls one at a time, so an update queued behind a request is applied
    after it: receivers switch weights between requests, never mid-sample (as in verl's and
    OpenRLHF's weight broadcast, the switch is a call on the inference actor).
    """

    def __init__(self, learners: list, system, model_dtype: str):
        """``learners``: the learner rank actors; ``system``: the system section; ``model_dtype``: ``model.dtype``."""
        self.learners, self.system, self.model_dtype = learners, system, model_dtype

    def publish(self, version: int, receivers: list) -> Publication:
        """Start publishing version ``version`` to ``receivers``; raises
        ``ray.exceptions.RayActorError`` when a learner rank is dead."""
        raise NotImplementedError

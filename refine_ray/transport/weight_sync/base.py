"""What every weight-sync backend shares: the tensor set it moves, the wire dtype, the interface.

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
    while the next rollout runs. ``gather_s``: seconds the driver spent starting the
    publication (the learner's gather and ``ray.put`` for the object store). ``weights``: the
    object-store ref of the published tensor set (object-store backend; None for the
    collective one, which keeps no copy): holding it keeps this version available, e.g. to
    redo work launched with it after a newer version was published.
    """

    acks: list = field(default_factory=list)
    gather_s: float = 0.0
    weights: Optional[ray.ObjectRef] = None


class WeightSync:
    """Interface: move the learner's weight tensor set to every receiver as version ``version``.

    Ray runs an actor's calls one at a time, so an update queued behind a request is applied
    after it: receivers switch weights between requests, never mid-sample (as in verl's and
    OpenRLHF's weight broadcast, the switch is a call on the inference actor).
    """

    def publish(self, version: int, receivers: list) -> Publication:
        """Start publishing version ``version`` to ``receivers`` (actor handles with the
        :class:`roles.common.VersionedWeights` methods); raises ``ray.exceptions.RayActorError``
        when a learner rank is dead."""
        raise NotImplementedError

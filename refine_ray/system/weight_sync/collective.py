"""Weight broadcast over a torch.distributed process group of its own (gloo on CPU, NCCL on GPU).

Learner rank 0 and every inference actor that holds policy weights form a
group (rank 0 = the learner). The group is built directly from a TCPStore,
so it never touches DeepSpeed's default process group. Weights travel in flat
buckets of ``bucket_mb``: one collective per bucket instead of one per tensor,
and no more than one bucket of extra memory on either side. Both sides walk
``named_parameters()`` of the same architecture in the same order, so only
the version number travels besides the buckets.
"""
from __future__ import annotations

from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist


def bucket_plan(numels: list[int], elem_bytes: int, bucket_mb: float) -> list[list[int]]:
    """Consecutive parameter indices per bucket; a tensor larger than a bucket gets its own."""
    limit = max(1, int(bucket_mb * 2**20 / elem_bytes))
    buckets: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(numels):
        if buckets[-1] and size + n > limit:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += n
    return [b for b in buckets if b]


def full_numel(p: torch.Tensor) -> int:
    """A parameter's full size, also when ZeRO-3 has partitioned it away (``ds_numel``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def sync_dtype(model_dtype: str) -> torch.dtype:
    """Weights travel in the inference dtype: bf16 on GPU when the model runs in bf16."""
    return torch.bfloat16 if (model_dtype == "bfloat16" and torch.cuda.is_available()) else torch.float32


class WeightGroup:
    """One member of a weight-broadcast group; ``rank 0`` sends, everyone else receives."""

    def __init__(self, host: str, port: int, world: int, rank: int, group_id: int, timeout_s: float = 120.0):
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world, rank == 0, timeout, wait_for_workers=False)
        store = dist.PrefixStore(f"refine-weights-{group_id}", store)
        self.rank, self.world = rank, world
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            self.pg = dist.ProcessGroupNCCL(store, rank, world)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world, timeout)
        self._store = store   # keep the store alive as long as the group

    def send(self, params: list[torch.nn.Parameter], dtype: torch.dtype, bucket_mb: float, gather=None) -> int:
        """Broadcast ``params`` bucket by bucket; ``gather(bucket)`` wraps ZeRO-3 gathers. Returns bytes."""
        sent = 0
        for idx in bucket_plan([full_numel(p) for p in params], torch.empty((), dtype=dtype).element_size(), bucket_mb):
            bucket = [params[i] for i in idx]
            with (gather(bucket) if gather else nullcontext()):
                flat = torch.cat([p.detach().to(self.device, dtype).reshape(-1) for p in bucket])
            self.pg.broadcast(flat, 0).wait()
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self, params: list[torch.nn.Parameter], dtype: torch.dtype, bucket_mb: float) -> None:
        """Receive the buckets into ``params`` in place (cast to each parameter's dtype)."""
        for idx in bucket_plan([p.numel() for p in params], torch.empty((), dtype=dtype).element_size(), bucket_mb):
            bucket = [params[i] for i in idx]
            flat = torch.empty(sum(p.numel() for p in bucket), dtype=dtype, device=self.device)
            self.pg.broadcast(flat, 0).wait()
            offset = 0
            with torch.no_grad():
                for p in bucket:
                    p.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()


def take_part_in_gathers(params: list[torch.nn.Parameter], dtype: torch.dtype, bucket_mb: float, gather) -> None:
    """Learner ranks other than 0 under ZeRO-3: join every bucket's gather, send nothing."""
    for idx in bucket_plan([full_numel(p) for p in params], torch.empty((), dtype=dtype).element_size(), bucket_mb):
        with gather([params[i] for i in idx]):
            pass

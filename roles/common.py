"""What every inference role shares: process set-up and versioned weights."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch


def setup_process(seed: int = 0) -> torch.device:
    """Per-actor process set-up: device, threads, determinism."""
    # Arrays fetched from the object store are read-only views by design; roles only read them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if not torch.cuda.is_available():
        # Ray gives each CPU actor a fraction of 2 cores: one BLAS thread each avoids thrashing.
        torch.set_num_threads(int(os.environ.get("REFINE_TORCH_THREADS", "1")))
    torch.manual_seed(seed)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class VersionedWeights:
    """Mixin: a role whose model follows the learner's published versions.

    Ray runs an actor's calls one at a time, so an update queued behind a
    request applies after it: a role switches weights between requests, never
    mid-sample, and stamps every output with the version it used.
    """

    version: int = 0

    def update_weights(self, version: int, weights: dict[str, np.ndarray]) -> int:
        if version < self.version:
            return self.version          # an older publication arriving late is ignored
        self._load_weights(weights)
        self.version = version
        return version

    def join_weight_group(self, host: str, port: int, world: int, rank: int, group_id: int,
                          timeout_s: float = 120.0) -> bool:
        from refine_ray.system.collective_sync import WeightGroup

        self.weight_group = WeightGroup(host, port, world, rank, group_id, timeout_s)
        return True

    def receive_weights(self, version: int, dtype_name: str, bucket_mb: float) -> int:
        """Receive a collective broadcast (collective weight sync); same ordering rules as update_weights."""
        from refine_ray.system.collective_sync import sync_dtype

        params = [p for _, p in self._weight_module().named_parameters()]
        self.weight_group.receive(params, sync_dtype(dtype_name), bucket_mb)
        self.version = max(self.version, version)
        return self.version

    def _weight_module(self):
        return self.model

    def get_version(self) -> int:
        return self.version

    def _load_weights(self, weights: dict[str, np.ndarray]) -> None:
        from refine_ray.refine.policy import load_numpy_weights

        load_numpy_weights(self.model, weights)

    def ping(self) -> bool:
        return True

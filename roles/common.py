"""What every inference role shares: process set-up and versioned weights."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch


def setup_process(seed: int = 0) -> torch.device:
    """Per-actor process set-up; returns the device the role computes on (the actor's GPU, else CPU).

    ``seed`` seeds torch's global generator (``train.seed + actor index``); REFINE's own draws
    (cuts, samples) use generators keyed by what they compute (refine.seeding), not this one.
    """
    # Arrays fetched from the object store are read-only views by design; roles only read them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if not torch.cuda.is_available():
        # Ray gives each CPU actor a fraction of 2 cores: one BLAS thread each avoids thrashing.
        torch.set_num_threads(int(os.environ.get("REFINE_TORCH_THREADS", "1")))
    torch.manual_seed(seed)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class VersionedWeights:
    """Mixin: a role whose model follows the learner's published weight versions.

    Ray runs an actor's calls one at a time, so an update queued behind a request applies
    after it: a role switches weights between requests, never mid-sample, and stamps every
    output with the version it used. The receiving halves of the weight-sync backends
    (refine_ray.system.weight_sync) do the copying; this mixin only orders versions.
    Subclasses set ``self.model`` (or override :meth:`_weight_module` / :meth:`_load_weights`).
    """

    version: int = 0

    def update_weights(self, version: int, weights: dict[str, np.ndarray], replay: bool = False) -> int:
        """Object-store backend: load ``weights`` (``{name: ndarray}``, the weight-sync tensor set)
        as ``version``; an older version arriving late is ignored, unless ``replay`` (the controller
        redoing lost work with the version it was launched with, then giving the current one back).
        Returns the version now held. Raises KeyError when ``weights`` lacks tensors of this model."""
        if version < self.version and not replay:
            return self.version
        self._load_weights(weights)
        self.version = version
        return version

    def join_weight_group(self, host: str, port: int, world: int, rank: int, group_id: int,
                          timeout_s: float = 120.0) -> bool:
        """Collective backend: join broadcast group ``group_id`` as member ``rank`` of ``world``."""
        from refine_ray.system.weight_sync.collective import WeightGroup

        self.weight_group = WeightGroup(host, port, world, rank, group_id, timeout_s)
        return True

    def receive_weights(self, version: int, model_dtype: str, bucket_mb: float) -> int:
        """Collective backend: receive one broadcast as ``version`` (same ordering rules as
        :meth:`update_weights`); returns the version now held."""
        from refine_ray.system.weight_sync.collective import receive_weights

        receive_weights(self._weight_module(), self.weight_group, model_dtype, bucket_mb)
        self.version = max(self.version, version)
        return self.version

    def _weight_module(self) -> torch.nn.Module:
        return self.model

    def _load_weights(self, weights: dict[str, np.ndarray]) -> None:
        from refine_ray.system.weight_sync.object_store import load_weights

        load_weights(self._weight_module(), weights)

    def get_version(self) -> int:
        """The weight version this actor holds (0: the initial weights)."""
        return self.version

    def ping(self) -> bool:
        """Liveness probe used by the actor group."""
        return True

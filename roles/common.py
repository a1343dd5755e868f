"""What the roles share: process set-up and versioned weights."""
from __future__ import annotations

import os
import warnings

import torch

from refine_ray.config import SystemConfig
from refine_ray.transport import weight_sync


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


class Role:
    """What every role's actor answers: the actor group's liveness probe."""

    def ping(self) -> bool:
        """Liveness probe used by the actor group."""
        return True


class VersionedWeights(Role):
    """Mixin: a role whose model follows the learner's published weight versions.

    Ray runs an actor's calls one at a time, in the order the driver sent them, so an update
    queued behind a request applies after it: a role switches weights between requests, never
    mid-sample, and stamps every output with the version it used. The receiver of the run's
    weight-sync backend (refine_ray.transport.weight_sync) does the loading; this mixin holds it
    and the version. Subclasses call :meth:`init_weight_sync` and set ``self.model`` (or
    override :meth:`weight_target`).
    """

    version: int = 0

    def init_weight_sync(self, system: SystemConfig, model_dtype: str) -> None:
        """Build the receiver of the backend ``system.weight_sync`` names."""
        self.weight_receiver = weight_sync.backend(system.weight_sync).receiver(system, model_dtype)

    def connect_weights(self, group, rank: int) -> bool:
        """Join the publisher's ``group`` (collective backends) as member ``rank``."""
        self.weight_receiver.connect(group, rank)
        return True

    def receive_weights(self, version: int, payload) -> int:
        """Load one publication (``payload``: the backend's, e.g. the object-store dict) as ``version``,
        also an older one (the controller redoing lost work with the version it was launched with,
        then giving the current one back). Returns the version now held. Raises KeyError when the
        weights lack tensors of this model."""
        self.weight_receiver.receive(self.weight_target(), payload)
        self.version = version
        return version

    def weight_target(self):
        """What the receiver loads into: the role's module (or an engine that loads itself)."""
        return self.model

    def get_version(self) -> int:
        """The weight version this actor holds (0: the initial weights)."""
        return self.version

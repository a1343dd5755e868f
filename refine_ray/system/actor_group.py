"""The actors of one role: creation, replacement of dead actors, elastic growth.

Inference roles hold no state the driver cannot give back (weights come from
the latest publication, data positions live in the driver, sampling seeds are
keyed by step and document), so a dead actor is simply replaced and its request
issued again (after the driver re-publishes the current weights). Actors in the role's placement group are replaced in place; the
elastic extras of the rollout role live outside placement groups, are added
while the cluster has free resources and are dropped when their node leaves.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import ray
from ray.exceptions import GetTimeoutError, RayActorError

log = logging.getLogger("refine_ray")


class RolePool:
    def __init__(self, role: str, cls, args_for: Callable[[int], tuple], options_for: Callable[[int], dict],
                 size: int):
        self.role, self.cls = role, cls
        self.args_for, self.options_for = args_for, options_for
        self.actors = [self._create(i, options_for(i)) for i in range(size)]
        self.fixed = size                  # actors [0, fixed) sit in the placement group
        self.elastic_options: Optional[dict] = None
        self.restarts = 0

    def _create(self, index: int, options: dict):
        return ray.remote(self.cls).options(**options).remote(*self.args_for(index))

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, i: int):
        return self.actors[i % len(self.actors)]

    def ready(self, timeout: float = 300.0) -> None:
        ray.get([a.ping.remote() for a in self.actors], timeout=timeout)

    def dead(self, timeout: float = 30.0) -> list[int]:
        """Indices of actors that do not answer a ping."""
        pings = {i: a.ping.remote() for i, a in enumerate(self.actors)}
        out = []
        for i, ref in pings.items():
            try:
                ray.get(ref, timeout=timeout)
            except (RayActorError, GetTimeoutError):
                out.append(i)
        return out

    def heal(self) -> int:
        """Replace dead placement-group actors, drop dead elastic ones; returns how many died.

        Replacements start from initial weights: the caller re-publishes the current version.
        """
        dead = self.dead()
        for i in sorted(dead, reverse=True):
            try:
                ray.kill(self.actors[i])
            except Exception:  # already gone
                pass
            if i >= self.fixed:
                log.warning("%s[%d] (elastic) died; dropping it", self.role, i)
                del self.actors[i]
                continue
            log.warning("%s[%d] died; replacing it", self.role, i)
            self.actors[i] = self._create(i, self.options_for(i))
            self.restarts += 1
        return len(dead)

    def grow(self, max_actors: int, options: dict) -> int:
        """Add elastic actors (outside placement groups) while the cluster has room; returns how many.

        New actors start from initial weights: the caller publishes the current version to them.
        """
        added = 0
        while len(self.actors) < max_actors and _fits(options):
            i = len(self.actors)
            actor = self._create(i, options)
            try:
                ray.get(actor.ping.remote(), timeout=120)
            except (RayActorError, GetTimeoutError):
                ray.kill(actor)
                break
            self.actors.append(actor)
            added += 1
            log.info("%s: elastic actor %d added (pool size %d)", self.role, i, len(self.actors))
        return added

    def kill_all(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass


def _fits(options: dict) -> bool:
    free = ray.available_resources()
    need = {"CPU": options.get("num_cpus", 0) or 0, "GPU": options.get("num_gpus", 0) or 0}
    need.update(options.get("resources", {}) or {})
    return all(free.get(k, 0.0) >= v for k, v in need.items() if v > 0)

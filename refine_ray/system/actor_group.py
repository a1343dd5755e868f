"""The actors of one role, learners included: creation, readiness, calls on all, replacement, elastic growth.

Inference roles hold no state the controller cannot give back (weights come from the
latest publication, data positions live in the controller, sampling seeds are keyed by
step, document, cut and sample), so a dead inference actor is simply replaced and its
request issued again after the controller re-publishes the current weights. Actors in
the role's placement group are replaced in place; the elastic extras of the rollout role
live outside placement groups, are added while the cluster has free resources and are
dropped when their node leaves. Learner ranks hold optimizer state: a dead rank is not
replaced, :meth:`ActorGroup.call_all` stops the job with one line instead.

Work is split by whole documents (:func:`document_shards`): a document's trunk pass,
cuts and samples stay on one actor.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

log = logging.getLogger("refine_ray")


class LearnerFailure(RuntimeError):
    """A learner rank died or raised: the job stops and resumes from the last checkpoint (one-line message)."""


def document_shards(n_docs: int, n_parts: int) -> list[list[int]]:
    """Document indices ``0..n_docs-1`` in ``n_parts`` contiguous shards of whole documents, sizes
    differing by at most one (``numpy.array_split``'s rule); empty shards when ``n_parts > n_docs``."""
    return [[int(i) for i in part] for part in np.array_split(np.arange(n_docs), n_parts)]


class ActorGroup:
    """``size`` actors of one role class, created with ``ray.remote(cls).options(**options_for(i))``
    and constructor arguments ``args_for(i)``.

    ``failure_hint()`` completes :meth:`call_all`'s error line (e.g. the checkpoint to resume from);
    ``timeout_setting`` = (config key, seconds) names the collective timeout a rank may have hit.
    """

    def __init__(self, role: str, cls, args_for: Callable[[int], tuple], options_for: Callable[[int], dict],
                 size: int, failure_hint: Callable[[], str] = lambda: "",
                 timeout_setting: Optional[tuple[str, float]] = None):
        """Create the ``size`` actors (not yet waited for: see :meth:`ready`)."""
        self.role, self.cls = role, cls
        self.args_for, self.options_for = args_for, options_for
        self.failure_hint, self.timeout_setting = failure_hint, timeout_setting
        self.actors = [self._create(i, options_for(i)) for i in range(size)]
        self.fixed = size                  # actors [0, fixed) sit in the placement group

    def _create(self, index: int, options: dict):
        return ray.remote(self.cls).options(**options).remote(*self.args_for(index))

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, i: int):
        """Actor ``i`` modulo the group size (shard ``i`` of a step goes to it)."""
        return self.actors[i % len(self.actors)]

    def ready(self, timeout: float = 300.0) -> None:
        """Wait until every actor answers a ping; raises GetTimeoutError / RayActorError."""
        ray.get([a.ping.remote() for a in self.actors], timeout=timeout)

    def call_all(self, method: str, *args, per_actor: Optional[list[tuple]] = None) -> list:
        """``method`` on every actor (with ``args``, or actor i with ``per_actor[i]``); the results in
        actor order.

        Raises:
            LearnerFailure: an actor died or raised; one line naming the first to fail (the
                others usually fail waiting on it in a collective), the cause's first line, a
                hint when it looks like a collective timeout, and ``failure_hint()``.
        """
        calls = per_actor if per_actor is not None else [args] * len(self.actors)
        refs = [getattr(a, method).remote(*a_args) for a, a_args in zip(self.actors, calls)]
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done[0])
            return ray.get(refs)
        except (RayActorError, RayTaskError) as e:
            hint = self.failure_hint()
            if isinstance(e, RayActorError):
                raise LearnerFailure(f"a {self.role} rank died during '{method}' ({type(e).__name__}); "
                                     f"{hint}") from None
            log.debug("%s rank failed during '%s': %s", self.role, method, e)
            cause = e.cause if isinstance(e.cause, BaseException) else e
            first = (str(cause).strip().splitlines() or [""])[0][:300]
            if self.timeout_setting and ("timed out" in first.lower() or "timeout" in type(cause).__name__.lower()):
                key, seconds = self.timeout_setting
                hint = (f"a collective waited longer than {key}={seconds:g} s (ranks made different collective "
                        f"calls, or one rank was that much slower); {hint}")
            raise LearnerFailure(f"{self.role} rank {refs.index(done[0])} failed during '{method}': "
                                 f"{type(cause).__name__}: {first}; {hint}") from None

    def dead(self, timeout: float = 30.0) -> list[int]:
        """Indices of actors that do not answer a ping within ``timeout`` seconds."""
        pings = {i: a.ping.remote() for i, a in enumerate(self.actors)}
        out = []
        for i, ref in pings.items():
            try:
                ray.get(ref, timeout=timeout)
            except (RayActorError, GetTimeoutError):
                out.append(i)
        return out

    def replace_dead(self) -> int:
        """Replace dead placement-group actors, drop dead elastic ones; returns how many died.

        Replacements start from the initial weights: the caller re-publishes the current version.
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
        return len(dead)

    def grow(self, max_actors: int, options: dict) -> int:
        """Add elastic actors (outside placement groups, with Ray ``options``) while the cluster has
        room, up to ``max_actors``; returns how many were added.

        New actors start from the initial weights: the caller publishes the current version to them.
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
            log.info("%s: elastic actor %d added (group size %d)", self.role, i, len(self.actors))
        return added

    def kill_all(self) -> None:
        """Kill every actor of the group (those already dead are skipped)."""
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

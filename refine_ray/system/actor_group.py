"""The actors of one role, learners included: creation, readiness, calls on all, replacement, elastic growth.

Inference roles hold no state the controller cannot give back (weights come from the
latest publication, data positions live in the controller, sampling seeds are keyed by
step, document, cut and sample), so a dead inference actor is simply replaced and its
request issued again after the controller re-publishes the current weights. An actor is
dead when Ray says so (its process or node is gone); one that is busy or still starting
is not. Actors in the role's placement group are replaced in place; a replacement may
wait for its bundle (its node left and no other node can hold it): :func:`wait_started`
names what it waits for at a fixed interval and stops the job after
``system.wait_timeout_s``. The elastic extras of the rollout role live outside placement
groups, are added while the cluster has free resources and are dropped when their node
leaves. Learner ranks hold optimizer state: a dead rank is not replaced,
:meth:`ActorGroup.call_all` stops the job with one line instead.

Work is split by whole documents (:func:`document_shards`): a document's trunk pass,
cuts and samples stay on one actor.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Optional

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from refine_ray.config import RolloutConfig
from refine_ray.system.placement import spec_str

log = logging.getLogger("refine_ray")


class LearnerFailure(RuntimeError):
    """A learner rank died or raised: the job stops and resumes from the last checkpoint (one-line message)."""


class ClusterWaitTimeout(LearnerFailure):
    """Replacement actors were not placed and started within ``system.wait_timeout_s``: the job
    stops with one line naming them and what they wait for (resumable like a learner failure)."""


def document_shards(n_docs: int, n_parts: int) -> list[list[int]]:
    """Document indices ``0..n_docs-1`` in ``n_parts`` contiguous shards of whole documents, sizes
    differing by at most one (``numpy.array_split``'s rule); empty shards when ``n_parts > n_docs``."""
    return [[int(i) for i in part] for part in np.array_split(np.arange(n_docs), n_parts)]


class ActorGroup:
    """``size`` actors of one role class, created with ``ray.remote(cls).options(**options_for(i))``
    and the constructor's keyword arguments ``kwargs_for(i)``.

    ``failure_hint()`` completes :meth:`call_all`'s error line (e.g. the checkpoint to resume from);
    ``timeout_setting`` = (config key, seconds) names the collective timeout a rank may have hit.
    """

    def __init__(self, role: str, cls, kwargs_for: Callable[[int], dict], options_for: Callable[[int], dict],
                 size: int, failure_hint: Callable[[], str] = lambda: "",
                 timeout_setting: Optional[tuple[str, float]] = None):
        """Create the ``size`` actors (not yet waited for: see :meth:`ready`)."""
        self.role, self.cls = role, cls
        self.kwargs_for, self.options_for = kwargs_for, options_for
        self.failure_hint, self.timeout_setting = failure_hint, timeout_setting
        self.actors = [self._create(i, options_for(i)) for i in range(size)]
        self.fixed = size                  # actors [0, fixed) sit in the placement group
        self.starting: list[int] = []      # replacements not yet seen answering (wait_started)

    def _create(self, index: int, options: dict):
        return ray.remote(self.cls).options(**options).remote(**self.kwargs_for(index))

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

    def dead(self, timeout: float = 5.0) -> list[int]:
        """Indices of the actors Ray reports dead: their ping fails with a RayActorError (not the
        transient ActorUnavailableError) within ``timeout`` seconds. Calls on a dead actor fail at
        once; an actor that does not answer in time is busy with queued work or still being
        placed and started, and is not counted (so no death is counted twice)."""
        pings = [a.ping.remote() for a in self.actors]
        if not pings:
            return []
        done, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout)
        out = []
        for i, ref in enumerate(pings):
            if ref not in done:
                continue
            try:
                ray.get(ref)
            except ActorUnavailableError:
                pass
            except RayActorError:
                out.append(i)
        return out

    def replace_dead(self) -> int:
        """Replace dead placement-group actors, drop dead elastic ones; returns how many died.

        Replacements start from the initial weights (the caller re-publishes the current version)
        and may still wait for their bundle: :func:`wait_started` waits for them.
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
            self.starting.append(i)
        return len(dead)

    def waits_for(self, index: int) -> tuple[str, bool]:
        """What actor ``index`` (not answering yet) waits for, in words, and whether that is a node
        for its resources: its placement-group bundle and whether a node holds it (then the actor
        is starting), or, outside placement groups, its resource request (counted as no node)."""
        options = self.options_for(index)
        strategy = options.get("scheduling_strategy")
        if not isinstance(strategy, PlacementGroupSchedulingStrategy):
            return f"{self.role}[{index}] asks for {spec_str([actor_request(options)])} (or is starting)", True
        table = placement_group_table(strategy.placement_group)
        b = strategy.placement_group_bundle_index
        where = f"bundle {b} {spec_str([_ordered(table['bundles'][b])])} of placement group '{table['name']}'"
        if table["bundles_to_node_id"].get(b):
            return f"{self.role}[{index}] is starting ({where} is placed)", False
        return f"{self.role}[{index}] waits for {where} ({table['state']}: no node can hold it now)", True

    def grow(self, max_actors: int, options: dict) -> int:
        """Add elastic actors (outside placement groups, with Ray ``options``) while the cluster has
        room, up to ``max_actors``; returns how many were added.

        New actors start from the initial weights: the caller publishes the current version to them.
        """
        added = 0
        while len(self.actors) < max_actors and room_for(options) > 0:
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


def wait_started(groups: Iterable[ActorGroup], limit_s: float, report_s: float,
                 hint: Callable[[], str] = lambda: "") -> None:
    """Wait until every replacement actor of ``groups`` (``ActorGroup.starting``) answers a ping or
    dies (a death is found, and counted once, by the next :meth:`ActorGroup.replace_dead`).

    Every ``report_s`` seconds one warning line names the actors still waiting, what each waits
    for (:meth:`ActorGroup.waits_for`) and the cluster's free resources. ``limit_s``
    (``system.wait_timeout_s``; 0: no limit, the right setting under an autoscaler) bounds the
    time during which some replacement has no node for its resources; an actor that is placed
    and starting (loading its model) does not count against it, and is reported the same way.

    Raises:
        ClusterWaitTimeout: after ``limit_s`` seconds without a node, one line naming the same
            and ``hint()``.
    """
    groups = list(groups)
    pings = {(g, i): g.actors[i].ping.remote() for g in groups for i in g.starting}
    for g in groups:
        g.starting = []
    start, unplaced_since, done, first = time.monotonic(), None, [], True
    while True:
        pings = {key: ref for key, ref in pings.items() if ref not in done}
        if not pings:
            return
        now, states = time.monotonic(), [g.waits_for(i) for g, i in pings]
        if not any(unplaced for _, unplaced in states):
            unplaced_since = None
        elif unplaced_since is None:
            unplaced_since = now
        what = "; ".join(text for text, _ in states)
        n = f"{len(pings)} replacement actor{'s' * (len(pings) > 1)}"
        free = f"the cluster has {spec_str([free_resources()])} free"
        if limit_s and unplaced_since is not None and now - unplaced_since >= limit_s:
            raise ClusterWaitTimeout(f"{n} found no node for {now - unplaced_since:.0f} s (system.wait_timeout_s="
                                     f"{limit_s:g}): {what}; {free}; {hint()}")
        if not first:
            log.warning("waiting %.0f s for %s: %s; %s; %s", now - start, n, what, free,
                        f"stopping after system.wait_timeout_s={limit_s:g} s without a node" if limit_s else
                        "waiting until a node that can hold them joins (system.wait_timeout_s=0)")
        left = limit_s - (now - unplaced_since) if limit_s and unplaced_since is not None else report_s
        done, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=max(0.0, min(report_s, left)))
        first = False


def free_resources() -> dict[str, float]:
    """The cluster's free CPUs, GPUs and custom resources now (Ray's memory, node and placement-group
    entries left out): ``{name: amount}``."""
    return _ordered({k: v for k, v in ray.available_resources().items()
                     if k not in ("memory", "object_store_memory") and not k.startswith("node:") and "_group_" not in k})


def _ordered(resources: dict[str, float]) -> dict[str, float]:
    """CPU, GPU, then the other resources by name (Ray's own order varies)."""
    return {k: resources[k] for k in sorted(resources, key=lambda k: (k not in ("CPU", "GPU"), k))}


def actor_request(options: dict) -> dict[str, float]:
    """The resources an actor with Ray ``options`` asks for: ``{"CPU": .., "GPU": .., custom: ..}``,
    positive amounts only."""
    need = {"CPU": options.get("num_cpus", 0) or 0, "GPU": options.get("num_gpus", 0) or 0}
    need.update(options.get("resources", {}) or {})
    return {k: float(v) for k, v in need.items() if v > 0}


def room_for(options: dict, free: Optional[dict[str, float]] = None) -> int:
    """How many more actors with Ray ``options`` the cluster's free resources (``free``, default
    :func:`free_resources` now) hold, counted over the whole cluster: an upper bound, since
    each actor must fit on one node."""
    free = free_resources() if free is None else free
    need = actor_request(options)
    if not need:                       # asks for nothing: never limited by resources
        return 1 << 30
    return int(min(free.get(k, 0.0) / v for k, v in need.items()) + 1e-9)


def elastic_options(rollout: RolloutConfig) -> dict:
    """Ray options of an elastic rollout actor (outside placement groups): ``rollout.cpus_per_actor``,
    ``gpus_per_actor`` and ``resources``."""
    return {"num_cpus": rollout.cpus_per_actor, "num_gpus": rollout.gpus_per_actor,
            "resources": {k: v for k, v in rollout.resources.items() if v > 0}}


def elastic_shortfall(rollout: RolloutConfig, colocated: bool, local: bool) -> Optional[str]:
    """The line to show at start when the cluster's free resources now hold fewer than the
    ``rollout.max_actors - num_actors`` elastic rollout actors: what each asks for, what is free,
    why (``colocated``: the shared placement group holds a whole GPU per learner rank) and
    whether the pool can still grow (``local``: an in-process cluster never gains nodes);
    None when there is room for all of them."""
    wanted = rollout.max_actors - rollout.num_actors
    options, free = elastic_options(rollout), free_resources()
    room = room_for(options, free)
    if wanted <= 0 or room >= wanted:
        return None
    ask = actor_request(options)
    why = (" (system.placement=colocated: the placement group holds a whole GPU per learner rank)"
           if colocated and free.get("GPU", 0.0) < ask.get("GPU", 0.0) else "")
    then = (f"a local cluster gets no new nodes, so the pool stays at {rollout.num_actors + room}" if local
            else "the pool grows when nodes with these resources join")
    return (f"rollout.max_actors={rollout.max_actors}: room for {room} of {wanted} elastic rollout actors now: each "
            f"asks for {spec_str([ask])}, the cluster has {spec_str([{k: free.get(k, 0.0) for k in ask}])} free"
            f"{why}; {then}")

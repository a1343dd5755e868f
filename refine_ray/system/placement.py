"""Where each actor runs: one placement group per role, or one shared group.

* ``disaggregated``: every role gets its own placement group, one bundle per
  actor (``{"GPU": gpus_per_actor, "CPU": cpus_per_actor}``), so roles never
  compete for a device.
* ``colocated``: one group of whole-GPU bundles, one per learner rank; learner
  rank i sits on bundle i and the inference actors are spread round-robin over
  the same bundles with their fractional ``gpus_per_actor``. The shares on each
  bundle must add up to at most one GPU.

Custom Ray resources (``learner.resources``, ``<role>.resources``: name -> amount
per rank/actor) go into the bundles (summed over a shared bundle's members) and
each actor asks for its own amount, so a bundle lands only on nodes that
advertise them: the KubeRay worker groups in deploy/kuberay advertise
``refine_learner``, ``refine_rollout`` and ``refine_aux`` to pin roles to groups.

On a CPU-only machine, a local cluster started with logical GPUs
(``system.num_gpus``) runs exactly the same placement code.

The layout's CPU, GPU and custom-resource totals are checked against the cluster before any
placement group is created, since Ray would otherwise wait for resources that
never come: in the driver before Ray starts when the local cluster's
``system.num_cpus``/``num_gpus`` are declared (:func:`check_resources`), and
against ``ray.cluster_resources()`` once connected.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from refine_ray.config import ConfigError, ExperimentConfig

INFERENCE_ROLES = ("scorer", "rollout", "reward", "reference")


@dataclass
class Slot:
    """One actor's place: its placement group, bundle index and what it asks for (GPUs, CPUs, custom)."""
    role: str
    index: int
    bundle: int
    gpus: float
    cpus: float
    group: str                     # which placement group ("shared" or the role name)
    resources: dict[str, float]    # custom Ray resources (role config ``resources``)


def plan_slots(cfg: ExperimentConfig) -> list[Slot]:
    """Pure planning (no Ray): every actor's bundle and resource share.

    Learner ranks first (index = rank), then scorer, rollout, reward and, when
    ``reference.enabled``, reference actors. Raises ConfigError when the
    colocated GPU shares on one bundle add up to more than one GPU.
    """
    slots: list[Slot] = []
    roles = [(name, getattr(cfg, name)) for name in INFERENCE_ROLES
             if name != "reference" or cfg.reference.enabled]
    lc = cfg.learner
    if cfg.system.placement == "disaggregated":
        for i in range(lc.num_ranks):
            slots.append(Slot("learner", i, i, lc.gpus_per_rank, lc.cpus_per_rank, "learner", dict(lc.resources)))
        for name, rc in roles:
            for i in range(rc.num_actors):
                slots.append(Slot(name, i, i, rc.gpus_per_actor, rc.cpus_per_actor, name, dict(rc.resources)))
        return slots
    n_bundles = lc.num_ranks
    for i in range(n_bundles):
        slots.append(Slot("learner", i, i, lc.gpus_per_rank, lc.cpus_per_rank, "shared", dict(lc.resources)))
    nxt = 0
    for name, rc in roles:
        for i in range(rc.num_actors):
            slots.append(Slot(name, i, nxt % n_bundles, rc.gpus_per_actor, rc.cpus_per_actor, "shared",
                              dict(rc.resources)))
            nxt += 1
    load = defaultdict(float)
    for s in slots:
        load[s.bundle] += s.gpus
    for b, total in load.items():
        if total > 1.0 + 1e-9:
            names = ", ".join(f"{s.role}[{s.index}]={s.gpus:g}" for s in slots if s.bundle == b)
            raise ConfigError(f"system.placement=colocated: GPU shares on bundle {b} add up to {total:g} > 1 "
                              f"({names}); lower learner.gpus_per_rank or <role>.gpus_per_actor")
    return slots


def bundle_specs(slots: list[Slot]) -> dict[str, list[dict[str, float]]]:
    """Bundles per placement group: a shared bundle holds one whole GPU (if any actor
    uses GPUs), the sum of its actors' CPUs and custom resources; a role's bundle holds its one actor.

    Returns ``{group: [bundle, ...]}``, each bundle a Ray resource dict such as
    ``{"GPU": 1.0, "CPU": 1.5, "refine_learner": 1.0}`` (a bundle that would be empty asks for 0.01 CPU).
    """
    grouped: dict[str, dict[int, list[Slot]]] = defaultdict(lambda: defaultdict(list))
    for s in slots:
        grouped[s.group][s.bundle].append(s)
    uses_gpu = any(s.gpus > 0 for s in slots)
    specs = {}
    for group, by_index in grouped.items():
        spec = []
        for i in sorted(by_index):
            members = by_index[i]
            gpu = (1.0 if uses_gpu else 0.0) if group == "shared" else max(s.gpus for s in members)
            bundle = {"GPU": gpu, "CPU": sum(s.cpus for s in members)}
            for s in members:
                for name, amount in s.resources.items():
                    bundle[name] = bundle.get(name, 0.0) + amount
            spec.append({k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.01})
        specs[group] = spec
    return specs


def _check_fits(cfg: ExperimentConfig, have: dict, where: dict) -> None:
    """Raise ConfigError when the layout's total CPUs, GPUs or custom resources exceed ``have``.

    ``have``: resource -> amount (CPU/GPU None: unknown, not checked; a custom resource
    missing from ``have`` counts as 0). ``where``: resource -> (key named in the message,
    how ``have`` is introduced)."""
    slots = plan_slots(cfg)
    specs = bundle_specs(slots)
    for name in dict.fromkeys(n for s in slots for n in s.resources):    # learner first, then roles
        need = sum(b.get(name, 0.0) for spec in specs.values() for b in spec)
        if need <= have.get(name, 0.0) + 1e-9:
            continue
        users = sorted({f"{s.role}.resources" for s in slots if name in s.resources})
        _, intro = where["custom"]
        raise ConfigError(f"{users[0]}: the layout needs {need:g} of custom resource '{name}' ({', '.join(users)}) "
                          f"but {intro}{have.get(name, 0.0):g}; start the cluster's nodes with it "
                          f"(ray start --resources, KubeRay rayStartParams.resources) or remove it")
    for res, field, hint in (
            ("GPU", "gpus", "on a CPU machine set system.num_gpus to declare logical GPUs, or set "
                            "learner.gpus_per_rank and <role>.gpus_per_actor to 0"),
            ("CPU", "cpus", "raise system.num_cpus, or lower learner.cpus_per_rank and <role>.cpus_per_actor")):
        need = sum(b.get(res, 0.0) for spec in specs.values() for b in spec)
        if have.get(res) is None or need <= have[res] + 1e-9:
            continue
        count: dict[str, list] = {}
        for s in slots:                  # per role: actors x share
            count.setdefault(s.role, [0, getattr(s, field)])[0] += 1
        parts = ", ".join(f"{role} {n} x {share:g}" for role, (n, share) in count.items())
        if res == "GPU" and "shared" in specs:
            parts = f"colocated: one whole GPU per learner rank, {len(specs['shared'])} ranks"
        key, intro = where[res]
        raise ConfigError(f"{key}: the layout needs {need:g} {res}s ({parts}) but {intro}{have[res]:g}; {hint}")


def check_resources(cfg: ExperimentConfig) -> None:
    """Before Ray starts: the layout fits the local cluster's declared ``system.num_cpus``/``num_gpus``.

    Counts every bundle Ray will be asked for (learner ranks and each running
    role's actors x their CPU/GPU share, colocated or disaggregated). The local
    cluster advertises no custom resources, so any ``<role>.resources`` fails
    here. Skipped for an existing cluster (``system.ray_address``,
    ``RAY_ADDRESS`` or Ray already initialised in this process) and for
    auto-detected resources, which :class:`Placement` checks once Ray is up.
    Raises ConfigError naming the key.
    """
    if cfg.system.ray_address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return
    _check_fits(cfg, {"CPU": cfg.system.num_cpus, "GPU": cfg.system.num_gpus},
                {"CPU": ("system.num_cpus", "system.num_cpus="), "GPU": ("system.num_gpus", "system.num_gpus="),
                 "custom": ("", "the local cluster (no system.ray_address) has ")})


def group_name(run: str, group: str, slots: list[Slot]) -> str:
    """The placement group's name, ``<run>:<roles>``: e.g. ``tiny-deltanet-mid:learner+scorer+rollout+reward``
    (colocated) or ``tiny-deltanet-mid:rollout`` (disaggregated), as the dashboard and
    ``ray.util.placement_group_table()`` show it. Unique within the job's namespace (one run per driver)."""
    return f"{run}:{'+'.join(dict.fromkeys(s.role for s in slots if s.group == group))}"


def spec_str(spec: list[dict[str, float]]) -> str:
    """Bundles as one readable line, e.g. ``{GPU: 1, CPU: 1.5}, {GPU: 1, CPU: 1.5}``."""
    return ", ".join("{" + ", ".join(f"{k}: {v:g}" for k, v in b.items()) + "}" for b in spec)


class Placement:
    """Creates the placement groups for a plan and hands out actor options.

    Needs ``ray.init()`` first. Raises ConfigError when the cluster's total
    resources cannot hold the layout, RuntimeError when a group is not
    scheduled within ``timeout_s`` seconds (e.g. no single node fits a bundle).
    """

    def __init__(self, cfg: ExperimentConfig, timeout_s: float = 120.0):
        self.slots = plan_slots(cfg)
        specs = bundle_specs(self.slots)
        have = ray.cluster_resources()
        _check_fits(cfg, {**have, "CPU": have.get("CPU", 0.0), "GPU": have.get("GPU", 0.0)},
                    {r: ("system.placement", "the Ray cluster has ") for r in ("CPU", "GPU", "custom")})
        self.groups = {group: placement_group(spec, strategy="PACK", name=group_name(cfg.name, group, self.slots))
                       for group, spec in specs.items()}
        for group, pg in self.groups.items():
            ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
            if not ready:
                raise RuntimeError(f"placement group for '{group}' not schedulable within {timeout_s:.0f}s "
                                   f"(bundles {spec_str(specs[group])}; cluster has {ray.cluster_resources()})")

    def options(self, role: str, index: int) -> dict:
        """``.options(**...)`` for actor ``index`` of ``role``: its GPUs, CPUs, custom resources and bundle."""
        (slot,) = [s for s in self.slots if s.role == role and s.index == index]
        opts = {
            "num_gpus": slot.gpus, "num_cpus": slot.cpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.groups[slot.group], placement_group_bundle_index=slot.bundle),
        }
        custom = {k: v for k, v in slot.resources.items() if v > 0}
        if custom:
            opts["resources"] = custom
        return opts

    def remove(self) -> None:
        """Remove every placement group (the actors in them die with them)."""
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups.values():
            remove_placement_group(pg)

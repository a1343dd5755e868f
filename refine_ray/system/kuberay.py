"""A typed model of the parts of the KubeRay ``ray.io/v1`` CRDs that deploy/kuberay uses.

    doc = load_manifest("deploy/kuberay/rayjob.yaml")        # -> Manifest(kind="RayJob", ...)
    python -m refine_ray.system.kuberay deploy/kuberay/*.yaml       # check manifests before kubectl apply

Besides RayCluster and RayJob it reads the ``v1`` PersistentVolumeClaim of the shared storage
(deploy/kuberay/pvc.yaml), so the command above checks every file of the folder.

Field names are the CRDs'. KubeRay-level objects reject unknown keys (the API server would drop a
typo such as ``minReplica`` silently); in pod templates only the modelled fields are checked. Each
problem raises :class:`ManifestError`, one line starting with the field path, e.g.
``spec.workerGroupSpecs[1].maxReplicas: 1 < minReplicas 2``.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional, Union

import yaml

API_VERSION = "ray.io/v1"
PVC_ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")
GPU_KEYS = ("nvidia.com/gpu", "amd.com/gpu", "google.com/tpu")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^(\+?(?:\d+\.?\d*|\.\d+))((?:[eE][+-]?\d+)|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_SUFFIX = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
           **{p: 1000 ** (i + 1) for i, p in enumerate("kMGTPE")},
           **{p + "i": 1024 ** (i + 1) for i, p in enumerate("KMGTPE")}}


class ManifestError(ValueError):
    """A manifest that KubeRay would reject or mis-run; the message starts with the field path."""


def _err(path: str, msg: str) -> ManifestError:
    return ManifestError(f"{path}: {msg}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_TYPE_NAMES = {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}


def _tname(v: Any) -> str:
    return _TYPE_NAMES.get(type(v), type(v).__name__)


def _mapping(v: Any, path: str, allowed: Optional[set[str]] = None) -> dict:
    if not isinstance(v, dict):
        raise _err(path, f"expected a mapping, got {_tname(v)}")
    unknown = [k for k in v if allowed is not None and k not in allowed]
    if unknown:
        raise _err(f"{path}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(allowed))})")
    return v


def _get(d: dict, key: str, path: str, kind: type, required: bool = False, default: Any = None) -> Any:
    p = _join(path, key)
    v = d.get(key)
    if v is None or (required and isinstance(v, str) and not v.strip()):
        if required:
            raise _err(p, "required field is missing" if v is None else "must not be empty")
        return default
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise _err(p, f"expected {_TYPE_NAMES[kind]}, got {_tname(v)} {v!r}")
    return v


def _items(d: dict, key: str, path: str) -> list[tuple[dict, str]]:
    """A list of mappings, each with its field path (``path.key[i]``)."""
    return [(_mapping(x, f"{path}.{key}[{i}]"), f"{path}.{key}[{i}]")
            for i, x in enumerate(_get(d, key, path, list, default=[]))]


def _unique(names: list[str], paths: list[str], what: str) -> None:
    for i, n in enumerate(names):
        if n in names[:i]:
            raise _err(paths[i], f"duplicate {what} {n!r} (also at {paths[names.index(n)]})")


def _nonneg_int(d: dict, key: str, path: str, default: Optional[int] = None, minimum: int = 0) -> Optional[int]:
    v = _get(d, key, path, int, default=default)
    if v is not None and v < minimum:
        raise _err(_join(path, key), f"{v} must be >= {minimum}")
    return v


def _enum(d: dict, key: str, path: str, choices: tuple[str, ...], default: Optional[str] = None,
          required: bool = False) -> Optional[str]:
    v = _get(d, key, path, str, required=required, default=default)
    if v is not None and v not in choices:
        raise _err(_join(path, key), f"{v!r} is not one of {', '.join(choices)}")
    return v


def _dns_name(v: str, path: str, max_len: int = 63) -> str:
    if not _DNS1123.match(v) or len(v) > max_len:
        raise _err(path, f"{v!r} is not a DNS-1123 label (lowercase letters, digits, '-', at most {max_len})")
    return v


def parse_quantity(v: Any, path: str = "quantity") -> Decimal:
    """A non-negative Kubernetes resource quantity ('8', '500m', '32Gi', 2, 0.5) as a Decimal.

    Suffixes as Kubernetes: decimal n u m k M G T P E, binary Ki..Ei, exponent e3. Raises
    ManifestError naming ``path`` for anything else."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise _err(path, f"expected a quantity such as '8', '500m' or '32Gi', got {_tname(v)}")
    m = _QUANTITY.match(str(v).strip())
    if not m:
        raise _err(path, f"{v!r} is not a Kubernetes quantity (e.g. '8', '500m', '32Gi')")
    num, suffix = Decimal(m.group(1)), m.group(2) or ""
    return num * (Decimal(10) ** int(suffix[1:]) if suffix[:1] in ("e", "E") else Decimal(_SUFFIX[suffix]))


def _string_map(v: Any, path: str) -> dict[str, str]:
    """rayStartParams and friends: KubeRay declares map[string]string, so numbers/bools must be quoted."""
    bad = [(k, x) for k, x in _mapping(v, path).items() if not isinstance(x, str)]
    if bad:
        raise _err(f"{path}.{bad[0][0]}", f"expected a string (quote it: '{bad[0][1]}'), got {_tname(bad[0][1])}")
    return v


def _ray_resources(params: dict[str, str], path: str) -> dict[str, float]:
    """rayStartParams.resources: a JSON mapping, usually written '"{\\"name\\": 8}"'."""
    raw = params.get("resources", "{}")
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].replace('\\"', '"')
    try:
        res = json.loads(text)
    except json.JSONDecodeError:
        raise _err(f"{path}.resources", f"{raw!r} is not a JSON mapping of resource name to amount") from None
    if not isinstance(res, dict) or not all(type(x) in (int, float) and x >= 0 for x in res.values()):
        raise _err(f"{path}.resources", f"{raw!r} must map resource names to amounts >= 0")
    return {str(k): float(x) for k, x in res.items()}


@dataclass
class Resources:
    """A container's resource requests and limits (quantities as Decimals)."""
    requests: dict[str, Decimal] = field(default_factory=dict)
    limits: dict[str, Decimal] = field(default_factory=dict)

    @classmethod
    def parse(cls, v: Any, path: str) -> "Resources":
        """Whole GPUs, GPU limits equal to requests, requests <= limits; ManifestError otherwise."""
        d = _mapping(v if v is not None else {}, path, {"requests", "limits", "claims"})
        out = {}
        for part in ("requests", "limits"):
            raw = _mapping(d.get(part) or {}, f"{path}.{part}")
            out[part] = {k: parse_quantity(q, f"{path}.{part}.{k}") for k, q in raw.items()}
        r = cls(**out)
        for k, part in ((k, part) for k in GPU_KEYS for part in ("limits", "requests")):
            q = getattr(r, part).get(k)
            if q is not None and q != q.to_integral_value():
                raise _err(f"{path}.{part}.{k}", f"{q} must be a whole number of devices")
            if k in r.requests and r.limits.get(k) != r.requests[k]:
                raise _err(f"{path}.limits.{k}", f"{r.limits.get(k)} must equal requests.{k} {r.requests[k]} "
                                                  f"(extended resources cannot be overcommitted)")
        for k, req in r.requests.items():
            if k in r.limits and req > r.limits[k]:
                raise _err(f"{path}.requests.{k}", f"{req} > limits.{k} {r.limits[k]}")
        return r

    def gpus(self) -> int:
        """GPU devices in the limits (NVIDIA, AMD or TPU keys)."""
        return int(sum(self.limits.get(k, Decimal(0)) for k in GPU_KEYS))


@dataclass
class Container:
    """One container of a pod template: name, image, resources, env and volume mounts."""
    name: str
    image: str
    resources: Resources
    env: dict[str, Optional[str]]
    volume_mounts: list[tuple[str, str]]

    @classmethod
    def parse(cls, v: Any, path: str) -> "Container":
        """Required name (DNS-1123) and image, unique env names; ManifestError naming the field."""
        d = _mapping(v, path)
        name = _dns_name(_get(d, "name", path, str, required=True), f"{path}.name")
        image = _get(d, "image", path, str, required=True)
        env_items = _items(d, "env", path)
        names = [_get(e, "name", ep, str, required=True) for e, ep in env_items]
        _unique(names, [f"{ep}.name" for _, ep in env_items], "environment variable")
        env = {n: _get(e, "value", ep, str) for n, (e, ep) in zip(names, env_items)}
        mounts = [(_get(m, "name", mp, str, required=True), _get(m, "mountPath", mp, str, required=True))
                  for m, mp in _items(d, "volumeMounts", path)]
        return cls(name, image, Resources.parse(d.get("resources"), f"{path}.resources"), env, mounts)


@dataclass
class PodTemplate:
    """A Ray pod's template: containers (the Ray container first), volume names and labels."""
    containers: list[Container]
    volumes: list[str]
    labels: dict[str, str]

    @classmethod
    def parse(cls, v: Any, path: str) -> "PodTemplate":
        """At least one container, unique names, every volume mount naming a declared volume."""
        d = _mapping(v, path, {"metadata", "spec"})
        meta = _mapping(d.get("metadata") or {}, f"{path}.metadata")
        labels = _string_map(meta.get("labels") or {}, f"{path}.metadata.labels")
        sp = f"{path}.spec"
        spec = _mapping(_get(d, "spec", path, dict, required=True), sp)
        raw = _get(spec, "containers", sp, list, required=True)
        if not raw:
            raise _err(f"{sp}.containers", "needs at least one container (the Ray container comes first)")
        containers = [Container.parse(c, f"{sp}.containers[{i}]") for i, c in enumerate(raw)]
        _unique([c.name for c in containers], [f"{sp}.containers[{i}].name" for i in range(len(raw))],
                "container name")
        volumes = [_get(vol, "name", vp, str, required=True) for vol, vp in _items(spec, "volumes", sp)]
        for ci, c in enumerate(containers):
            for mi, (name, _) in enumerate(c.volume_mounts):
                if name not in volumes:
                    raise _err(f"{sp}.containers[{ci}].volumeMounts[{mi}].name",
                               f"{name!r} is not in {sp}.volumes ({', '.join(volumes) or 'none'})")
        return cls(containers, volumes, labels)       # containers[0] is the Ray container


HEAD_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources", "labels"}
WORKER_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                 "template", "scaleStrategy", "suspend", "idleTimeoutSeconds", "resources", "labels"}
CLUSTER_FIELDS = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling", "autoscalerOptions",
                  "headServiceAnnotations", "suspend", "authOptions", "gcsFaultToleranceOptions", "managedBy",
                  "upgradeStrategy"}


@dataclass
class HeadGroupSpec:
    """The head group: ``ray start`` parameters, pod template and service type."""
    ray_start_params: dict[str, str]
    template: PodTemplate
    service_type: str = "ClusterIP"

    @classmethod
    def parse(cls, v: Any, path: str) -> "HeadGroupSpec":
        """String-valued rayStartParams, a JSON resources mapping, a known service type."""
        d = _mapping(v, path, HEAD_FIELDS)
        params = _string_map(_get(d, "rayStartParams", path, dict, default={}), f"{path}.rayStartParams")
        _ray_resources(params, f"{path}.rayStartParams")
        svc = _enum(d, "serviceType", path, ("ClusterIP", "NodePort", "LoadBalancer"), default="ClusterIP")
        return cls(params, PodTemplate.parse(_get(d, "template", path, dict, required=True), f"{path}.template"), svc)


@dataclass
class WorkerGroupSpec:
    """A worker group: replicas, ``ray start`` parameters, the custom Ray resources it advertises, pod template."""
    group_name: str
    replicas: int
    min_replicas: int
    max_replicas: int
    num_of_hosts: int
    ray_start_params: dict[str, str]
    ray_resources: dict[str, float]
    template: PodTemplate

    @classmethod
    def parse(cls, v: Any, path: str) -> "WorkerGroupSpec":
        """min <= replicas <= max, num-gpus within the Ray container's GPU limit; ManifestError otherwise."""
        d = _mapping(v, path, WORKER_FIELDS)
        name = _dns_name(_get(d, "groupName", path, str, required=True), f"{path}.groupName")
        lo = _nonneg_int(d, "minReplicas", path, default=0)
        hi = _nonneg_int(d, "maxReplicas", path, default=2**31 - 1)
        n = _nonneg_int(d, "replicas", path, default=lo)
        for bad, field_, msg in ((hi < lo, "maxReplicas", f"{hi} < minReplicas {lo}"),
                                 (n < lo, "replicas", f"{n} < minReplicas {lo}"),
                                 (n > hi, "replicas", f"{n} > maxReplicas {hi}")):
            if bad:
                raise _err(f"{path}.{field_}", msg)
        hosts = _nonneg_int(d, "numOfHosts", path, default=1, minimum=1)
        _nonneg_int(d, "idleTimeoutSeconds", path)
        params = _string_map(_get(d, "rayStartParams", path, dict, default={}), f"{path}.rayStartParams")
        res = _ray_resources(params, f"{path}.rayStartParams")
        tpl = PodTemplate.parse(_get(d, "template", path, dict, required=True), f"{path}.template")
        declared, have = params.get("num-gpus", "0"), tpl.containers[0].resources.gpus()
        if not re.fullmatch(r"\d+(\.\d*)?", declared) or float(declared) > have:
            raise _err(f"{path}.rayStartParams.num-gpus", f"{declared!r} is not a number <= the Ray container's "
                                                          f"GPU limit {have}")
        return cls(name, n, lo, hi, hosts, params, res, tpl)


@dataclass
class RayClusterSpec:
    """A RayCluster's spec (also a RayJob's ``rayClusterSpec``)."""
    ray_version: str
    head_group_spec: HeadGroupSpec
    worker_group_specs: list[WorkerGroupSpec]
    enable_in_tree_autoscaling: bool = False
    upscaling_mode: Optional[str] = None
    idle_timeout_seconds: Optional[int] = None
    auth_mode: Optional[str] = None

    @classmethod
    def parse(cls, v: Any, path: str) -> "RayClusterSpec":
        """A quoted Ray release, known autoscaler/auth modes, head and uniquely named worker groups."""
        d = _mapping(v, path, CLUSTER_FIELDS)
        version = _get(d, "rayVersion", path, str, required=True)
        if not re.fullmatch(r"\d+\.\d+\.\d+", version):
            raise _err(f"{path}.rayVersion", f"{version!r} is not a Ray release such as '2.60.0' (quote it in YAML)")
        auto = _get(d, "enableInTreeAutoscaling", path, bool, default=False)
        ap, au = f"{path}.autoscalerOptions", f"{path}.authOptions"
        ao = _mapping(d.get("autoscalerOptions") or {}, ap)
        mode = _enum(ao, "upscalingMode", ap, ("Default", "Aggressive", "Conservative"))
        idle = _nonneg_int(ao, "idleTimeoutSeconds", ap)
        auth = _enum(_mapping(d.get("authOptions") or {}, au), "mode", au, ("disabled", "token"))
        head = HeadGroupSpec.parse(_get(d, "headGroupSpec", path, dict, required=True), f"{path}.headGroupSpec")
        workers = [WorkerGroupSpec.parse(w, f"{path}.workerGroupSpecs[{i}]")
                   for i, w in enumerate(_get(d, "workerGroupSpecs", path, list, default=[]))]
        _unique([w.group_name for w in workers],
                [f"{path}.workerGroupSpecs[{i}].groupName" for i in range(len(workers))], "group name")
        return cls(version, head, workers, auto, mode, idle, auth)


JOB_FIELDS = {"entrypoint", "rayClusterSpec", "clusterSelector", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
              "activeDeadlineSeconds", "backoffLimit", "runtimeEnvYAML", "submissionMode", "submitterPodTemplate",
              "submitterConfig", "jobId", "metadata", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources",
              "suspend", "managedBy", "deletionStrategy"}


@dataclass
class RayJobSpec:
    """A RayJob's spec: the entrypoint, its cluster (new or selected) and lifetime settings."""
    entrypoint: str
    ray_cluster_spec: Optional[RayClusterSpec]
    cluster_selector: dict[str, str]
    shutdown_after_job_finishes: bool
    ttl_seconds_after_finished: int
    runtime_env: dict
    submission_mode: str
    active_deadline_seconds: Optional[int]

    @classmethod
    def parse(cls, v: Any, path: str) -> "RayJobSpec":
        """A non-empty entrypoint, exactly one of rayClusterSpec / clusterSelector, a valid runtimeEnvYAML."""
        d = _mapping(v, path, JOB_FIELDS)
        entry = _get(d, "entrypoint", path, str, required=True)
        selector = _string_map(d.get("clusterSelector") or {}, f"{path}.clusterSelector")
        rcs = d.get("rayClusterSpec")
        if (rcs is None) == (not selector):
            raise _err(f"{path}.rayClusterSpec", "set exactly one of rayClusterSpec (new cluster) or clusterSelector")
        spec = RayClusterSpec.parse(rcs, f"{path}.rayClusterSpec") if rcs is not None else None
        shutdown = _get(d, "shutdownAfterJobFinishes", path, bool, default=False)
        ttl = _nonneg_int(d, "ttlSecondsAfterFinished", path, default=0)
        if ttl and not shutdown:
            raise _err(f"{path}.ttlSecondsAfterFinished", "has no effect unless shutdownAfterJobFinishes is true")
        deadline = _nonneg_int(d, "activeDeadlineSeconds", path, minimum=1)
        _nonneg_int(d, "backoffLimit", path)
        mode = _enum(d, "submissionMode", path, ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
                     default="K8sJobMode")
        try:
            env = _mapping(yaml.safe_load(_get(d, "runtimeEnvYAML", path, str, default="")) or {},
                           f"{path}.runtimeEnvYAML")
        except yaml.YAMLError as e:
            raise _err(f"{path}.runtimeEnvYAML", f"not valid YAML ({str(e).splitlines()[0]})") from None
        _string_map(env.get("env_vars") or {}, f"{path}.runtimeEnvYAML.env_vars")
        return cls(entry, spec, selector, shutdown, ttl, env, mode, deadline)


@dataclass
class PvcSpec:
    """The shared storage claim: access modes, requested size (bytes) and storage class."""
    access_modes: list[str]
    storage: Decimal
    storage_class: Optional[str]

    @classmethod
    def parse(cls, v: Any, path: str) -> "PvcSpec":
        """Known access modes including ReadWriteMany (every Ray pod mounts the claim), a storage request."""
        d = _mapping(v, path)
        modes = _get(d, "accessModes", path, list, required=True)
        for i, m in enumerate(modes):
            if m not in PVC_ACCESS_MODES:
                raise _err(f"{path}.accessModes[{i}]", f"{m!r} is not one of {', '.join(PVC_ACCESS_MODES)}")
        if "ReadWriteMany" not in modes:
            raise _err(f"{path}.accessModes", f"{modes} lacks ReadWriteMany (pods on several nodes mount the claim)")
        rp = f"{path}.resources"
        requests = _mapping(_get(_mapping(d.get("resources") or {}, rp), "requests", rp, dict, required=True),
                            f"{rp}.requests")
        if "storage" not in requests:
            raise _err(f"{rp}.requests.storage", "required field is missing")
        storage = parse_quantity(requests["storage"], f"{rp}.requests.storage")
        return cls(modes, storage, _get(d, "storageClassName", path, str))


@dataclass
class Manifest:
    """A validated RayCluster (spec: RayClusterSpec), RayJob (RayJobSpec) or PersistentVolumeClaim (PvcSpec)."""
    kind: str
    name: str
    namespace: Optional[str]
    spec: Union[RayClusterSpec, RayJobSpec, PvcSpec]


# kind -> (apiVersion, spec type, longest metadata.name: KubeRay derives longer names from a Ray object's)
KINDS = {"RayCluster": (API_VERSION, RayClusterSpec, 47), "RayJob": (API_VERSION, RayJobSpec, 47),
         "PersistentVolumeClaim": ("v1", PvcSpec, 253)}


def validate_manifest(doc: Any) -> Manifest:
    """Check one loaded manifest (a dict); returns the typed object or raises ManifestError."""
    d = _mapping(doc, "manifest")
    api = _get(d, "apiVersion", "", str, required=True)
    kind = _enum(d, "kind", "", tuple(KINDS), required=True)
    want_api, spec_type, max_name = KINDS[kind]
    if api != want_api:
        raise _err("apiVersion", f"{api!r} is not {want_api!r} (kind {kind})")
    meta = _mapping(_get(d, "metadata", "", dict, required=True), "metadata")
    name = _dns_name(_get(meta, "name", "metadata", str, required=True), "metadata.name", max_name)
    ns = _get(meta, "namespace", "metadata", str)
    spec = _get(d, "spec", "", dict, required=True)
    return Manifest(kind, name, ns, spec_type.parse(spec, "spec"))


def load_manifest(path: str | Path) -> Manifest:
    """Read one YAML file holding one manifest and validate it; ManifestError names the file or field."""
    try:
        docs = [x for x in yaml.safe_load_all(Path(path).read_text()) if x is not None]
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if len(docs) != 1:
        raise ManifestError(f"{path}: expected one YAML document, found {len(docs)}")
    return validate_manifest(docs[0])


def main(argv: list[str] | None = None) -> int:
    """Check every manifest file named on the command line: 0 when all are valid, 1 otherwise (or none given)."""
    paths, bad = (sys.argv[1:] if argv is None else argv), 0
    for p in paths:
        try:
            m = load_manifest(p)
            print(f"ok  {p}: {m.kind} {m.name}")
        except (ManifestError, OSError) as e:
            bad += 1
            print(f"bad {p}: {e}", file=sys.stderr)
    return 1 if bad or not paths else 0


if __name__ == "__main__":
    sys.exit(main())

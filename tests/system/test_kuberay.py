"""The shipped KubeRay manifests validate; broken variants fail naming the field path."""
import copy
import shlex
from pathlib import Path

import pytest
import yaml

from refine_ray.config import load_config
from refine_ray.system.kuberay import ManifestError, load_manifest, main, parse_quantity, validate_manifest
from refine_ray.system.placement import bundle_specs, plan_slots

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "deploy" / "kuberay" / "raycluster.yaml"
JOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
PVC = ROOT / "deploy" / "kuberay" / "pvc.yaml"


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_shipped_raycluster_validates():
    m = load_manifest(CLUSTER)
    assert (m.kind, m.name) == ("RayCluster", "refine-ray")
    spec = m.spec
    assert spec.enable_in_tree_autoscaling and spec.auth_mode == "token"
    assert [w.group_name for w in spec.worker_group_specs] == ["learner", "rollout", "aux"]
    (learner,) = [w for w in spec.worker_group_specs if w.group_name == "learner"]
    assert learner.template.containers[0].resources.gpus() == 8
    assert learner.ray_resources == {"refine_learner": 8.0}
    for w in spec.worker_group_specs:                 # every role group: own resource, GPUs, shared claim
        assert w.min_replicas <= w.replicas <= w.max_replicas
        assert w.ray_resources == {f"refine_{w.group_name}": float(w.template.containers[0].resources.gpus())}
        assert ("shared", "/mnt/refine") in w.template.containers[0].volume_mounts
    assert spec.head_group_spec.ray_start_params["num-cpus"] == "0"


def test_shipped_rayjob_validates_and_its_entrypoint_is_a_valid_config():
    m = load_manifest(JOB)
    assert m.kind == "RayJob" and m.spec.shutdown_after_job_finishes
    assert m.spec.runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    # the job's cluster is the standalone cluster's spec
    assert _raw(JOB)["spec"]["rayClusterSpec"] == _raw(CLUSTER)["spec"]
    argv = shlex.split(m.spec.entrypoint)
    assert argv[:3] == ["refine-ray", "train", "--config"]
    config = ROOT / Path(argv[3]).relative_to("/app")          # the image holds the repo at /app
    cfg = load_config(config, argv[4:])
    assert cfg.system.ray_address == "auto"
    assert cfg.train.output_dir.startswith("/mnt/refine/") and cfg.data.path.startswith("/mnt/refine/")
    (learner,) = [w for w in m.spec.ray_cluster_spec.worker_group_specs if w.group_name == "learner"]
    assert cfg.learner.num_ranks <= learner.template.containers[0].resources.gpus()


def test_rayjob_bundles_ask_for_a_resource_that_pins_them_to_the_learner_group():
    """The job's placement bundles carry refine_learner, which only the learner group advertises, and fit its nodes."""
    m = load_manifest(JOB)
    argv = shlex.split(m.spec.entrypoint)
    cfg = load_config(ROOT / Path(argv[3]).relative_to("/app"), argv[4:])
    bundles = [b for spec in bundle_specs(plan_slots(cfg)).values() for b in spec]
    assert all(b.get("refine_learner") == 1.0 for b in bundles) and len(bundles) == cfg.learner.num_ranks
    groups = {w.group_name: w for w in m.spec.ray_cluster_spec.worker_group_specs}
    advertising = [name for name, w in groups.items() if "refine_learner" in w.ray_resources]
    assert advertising == ["learner"]
    learner = groups["learner"]
    per_node = learner.ray_resources["refine_learner"]
    assert sum(b["refine_learner"] for b in bundles) <= per_node * learner.max_replicas
    assert all(b.get("GPU", 0) <= learner.template.containers[0].resources.gpus() for b in bundles)


def test_manifest_check_command_accepts_every_shipped_file(capsys):
    """`python -m refine_ray.system.kuberay deploy/kuberay/*.y*ml` (docs/operations.md) passes, pvc.yaml included."""
    files = sorted(str(p) for p in (ROOT / "deploy" / "kuberay").glob("*.y*ml"))
    assert str(PVC) in files
    assert main(files) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"ok  {PVC}: PersistentVolumeClaim refine-ray-shared" in out
    pvc = load_manifest(PVC)
    assert pvc.spec.access_modes == ["ReadWriteMany"] and pvc.spec.storage == 2 * 2**40
    # every Ray pod mounts this claim
    for manifest in (CLUSTER, JOB):
        claims = {v["persistentVolumeClaim"]["claimName"] for v in _volumes(_raw(manifest)) if "persistentVolumeClaim" in v}
        assert claims == {pvc.name}
    assert main([str(CLUSTER), str(ROOT / "README.md")]) == 1


def _volumes(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        yield from group["template"]["spec"]["volumes"]


PVC_BREAKS = [
    ("read write once", lambda d: d["spec"].update(accessModes=["ReadWriteOnce"]),
     "spec.accessModes: ['ReadWriteOnce'] lacks ReadWriteMany"),
    ("unknown mode", lambda d: d["spec"].update(accessModes=["ReadWriteMany", "RWX"]),
     "spec.accessModes[1]: 'RWX' is not one of"),
    ("no size", lambda d: d["spec"]["resources"]["requests"].pop("storage"),
     "spec.resources.requests.storage: required field is missing"),
    ("bad size", lambda d: d["spec"]["resources"]["requests"].update(storage="2TB"),
     "spec.resources.requests.storage: '2TB' is not a Kubernetes quantity"),
    ("api version", lambda d: d.update(apiVersion="ray.io/v1"), "apiVersion: 'ray.io/v1' is not 'v1'"),
]


@pytest.mark.parametrize("mutate,expected", [(m, e) for _, m, e in PVC_BREAKS], ids=[n for n, _, _ in PVC_BREAKS])
def test_broken_pvc(mutate, expected):
    _assert_rejected(PVC, mutate, expected)


def test_quantities():
    assert parse_quantity("500m") == parse_quantity(0.5)
    assert parse_quantity("32Gi") == 32 * 2**30
    assert parse_quantity("1e3") == parse_quantity("1k") == 1000


def _worker(d, i):
    return d["spec"]["workerGroupSpecs"][i]


def _ray_container(d, i):
    return _worker(d, i)["template"]["spec"]["containers"][0]


def _set_replicas(d, i, lo, n, hi):
    _worker(d, i).update(minReplicas=lo, replicas=n, maxReplicas=hi)


W0, W1, W2 = "spec.workerGroupSpecs[0]", "spec.workerGroupSpecs[1]", "spec.workerGroupSpecs[2]"
C0 = f"{W0}.template.spec.containers[0]"
CLUSTER_BREAKS = [
    ("max<min", lambda d: _set_replicas(d, 1, 2, 2, 1), f"{W1}.maxReplicas: 1 < minReplicas 2"),
    ("replicas>max", lambda d: _set_replicas(d, 2, 0, 5, 4), f"{W2}.replicas: 5 > maxReplicas 4"),
    ("replicas<min", lambda d: _set_replicas(d, 0, 2, 1, 4), f"{W0}.replicas: 1 < minReplicas 2"),
    ("negative min", lambda d: _set_replicas(d, 0, -1, 1, 4), f"{W0}.minReplicas: -1 must be >= 0"),
    ("duplicate group", lambda d: _worker(d, 2).update(groupName="rollout"), f"{W2}.groupName: duplicate"),
    ("group name", lambda d: _worker(d, 0).update(groupName="Learner_1"), f"{W0}.groupName: 'Learner_1'"),
    ("typo field", lambda d: _worker(d, 0).update(minReplica=1), f"{W0}.minReplica: unknown field"),
    ("missing template", lambda d: _worker(d, 1).pop("template"), f"{W1}.template: required"),
    ("int rayStartParam", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     "spec.headGroupSpec.rayStartParams.num-cpus: expected a string"),
    ("bad ray resources", lambda d: _worker(d, 1)["rayStartParams"].update(resources="{refine_rollout: 8"),
     f"{W1}.rayStartParams.resources:"),
    ("num-gpus > limit", lambda d: _worker(d, 2)["rayStartParams"].update({"num-gpus": "4"}),
     f"{W2}.rayStartParams.num-gpus: '4' is not a number <= the Ray container's GPU limit 2"),
    ("bad quantity", lambda d: _ray_container(d, 0)["resources"]["limits"].update(memory="480GB"),
     f"{C0}.resources.limits.memory: '480GB' is not a Kubernetes quantity"),
    ("gpu limit != request", lambda d: _ray_container(d, 0)["resources"]["limits"].update({"nvidia.com/gpu": "4"}),
     f"{C0}.resources.limits.nvidia.com/gpu: 4 must equal requests.nvidia.com/gpu 8"),
    ("request > limit", lambda d: _ray_container(d, 0)["resources"]["requests"].update(cpu="64"),
     f"{C0}.resources.requests.cpu: 64 > limits.cpu 48"),
    ("fractional gpu", lambda d: _ray_container(d, 0)["resources"]["limits"].update({"nvidia.com/gpu": "500m"}),
     f"{C0}.resources.limits.nvidia.com/gpu: 0.500 must be a whole number"),
    ("env value int", lambda d: _ray_container(d, 0)["env"][0].update(value=1), f"{C0}.env[0].value: expected string"),
    ("no image", lambda d: _ray_container(d, 0).pop("image"), f"{C0}.image: required field is missing"),
    ("no containers", lambda d: _worker(d, 0)["template"]["spec"].update(containers=[]),
     f"{W0}.template.spec.containers: needs at least one container"),
    ("unknown volume", lambda d: _worker(d, 0)["template"]["spec"]["volumes"].pop(0),
     f"{C0}.volumeMounts[0].name: 'shared' is not in {W0}.template.spec.volumes"),
    ("rayVersion float", lambda d: d["spec"].update(rayVersion=2.6), "spec.rayVersion: expected string"),
    ("autoscaling flag str", lambda d: d["spec"].update(enableInTreeAutoscaling="true"),
     "spec.enableInTreeAutoscaling: expected boolean"),
    ("upscaling mode", lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"),
     "spec.autoscalerOptions.upscalingMode: 'Fast' is not one of"),
    ("api version", lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion: 'ray.io/v1alpha1' is not"),
    ("kind", lambda d: d.update(kind="RayService"), "kind: 'RayService' is not one of"),
    ("no head", lambda d: d["spec"].pop("headGroupSpec"), "spec.headGroupSpec: required field is missing"),
]


@pytest.mark.parametrize("mutate,expected", [(m, e) for _, m, e in CLUSTER_BREAKS],
                         ids=[n for n, _, _ in CLUSTER_BREAKS])
def test_broken_raycluster(mutate, expected):
    _assert_rejected(CLUSTER, mutate, expected)


def _assert_rejected(manifest, mutate, expected):
    """The manifest, broken by ``mutate``, fails with one line starting with ``expected``."""
    doc = copy.deepcopy(_raw(manifest))
    mutate(doc)
    with pytest.raises(ManifestError) as info:
        validate_manifest(doc)
    msg = str(info.value)
    assert msg.startswith(expected), msg
    assert "\n" not in msg


R = "spec.rayClusterSpec"
JOB_BREAKS = [
    ("no entrypoint", lambda d: d["spec"].pop("entrypoint"), "spec.entrypoint: required field is missing"),
    ("blank entrypoint", lambda d: d["spec"].update(entrypoint="  "), "spec.entrypoint: must not be empty"),
    ("no cluster", lambda d: d["spec"].pop("rayClusterSpec"), "spec.rayClusterSpec: set exactly one of"),
    ("ttl without shutdown", lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
     "spec.ttlSecondsAfterFinished: has no effect"),
    ("submission mode", lambda d: d["spec"].update(submissionMode="Batch"), "spec.submissionMode: 'Batch'"),
    ("runtime env yaml", lambda d: d["spec"].update(runtimeEnvYAML="env_vars: [a"), "spec.runtimeEnvYAML: not valid"),
    ("runtime env int", lambda d: d["spec"].update(runtimeEnvYAML="env_vars: {HF_HUB_OFFLINE: 1}"),
     "spec.runtimeEnvYAML.env_vars.HF_HUB_OFFLINE: expected a string"),
    ("nested cluster", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][1].update(maxReplicas=-1),
     f"{R}.workerGroupSpecs[1].maxReplicas: -1 must be >= 0"),
    ("name", lambda d: d["metadata"].update(name="Refine_Mid"), "metadata.name: 'Refine_Mid'"),
]


@pytest.mark.parametrize("mutate,expected", [(m, e) for _, m, e in JOB_BREAKS], ids=[n for n, _, _ in JOB_BREAKS])
def test_broken_rayjob(mutate, expected):
    _assert_rejected(JOB, mutate, expected)

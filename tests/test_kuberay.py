"""scripts/check_kuberay.py: the shipped KubeRay manifests pass KubeRay's own CRD schemas (stored in
deploy/kuberay/schemas with their release) and the run checks; broken variants fail with one line
``FILE: PATH: expected ...``. Every variant in BREAKS was accepted by the hand-written validator
this replaces (refine_ray/system/kuberay.py), which knew only the fields it modelled, as were the
shipped manifests' rayStartParams labels that KubeRay >= 1.5.0 refuses; KEPT are that validator's
checks kept here."""
import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
CLUSTER, JOB, PVC = KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml", KUBERAY / "pvc.yaml"

_spec = importlib.util.spec_from_file_location("check_kuberay", ROOT / "scripts" / "check_kuberay.py")
check_kuberay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_kuberay)


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_stored_schemas_name_their_kuberay_release_and_source():
    """Each stored schema records the KubeRay release, commit and CRD path it came from; the README and
    the manifests name the same release."""
    schemas = check_kuberay.load_schemas()
    assert set(schemas) == {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")}
    for (_, kind), stored in schemas.items():
        assert stored["kuberay"] == "v1.5.1" and re.fullmatch(r"[0-9a-f]{40}", stored["commit"])
        assert stored["source"] == f"ray-operator/config/crd/bases/ray.io_{kind.lower()}s.yaml"
        assert stored["openAPIV3Schema"]["properties"]["spec"]["type"] == "object"
        readme = (KUBERAY / "schemas" / "README.md").read_text()
        assert stored["kuberay"] in readme and stored["commit"] in readme and stored["source"] in readme
    assert "KubeRay >= 1.5.1" in CLUSTER.read_text()
    assert "KubeRay >= 1.5.1" in (ROOT / "docs" / "operations.md").read_text()


def test_shipped_manifests_pass(capsys):
    """The command docs/operations.md gives passes on every file of deploy/kuberay."""
    files = sorted(str(p) for p in KUBERAY.glob("*.y*ml"))
    assert files == [str(PVC), str(CLUSTER), str(JOB)]
    assert check_kuberay.main(files) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok  {PVC}: PersistentVolumeClaim refine-ray-shared (run checks only)",
                   f"ok  {CLUSTER}: RayCluster refine-ray (KubeRay v1.5.1 schema)",
                   f"ok  {JOB}: RayJob refine-mid (KubeRay v1.5.1 schema)"]
    assert _raw(JOB)["spec"]["rayClusterSpec"] == _raw(CLUSTER)["spec"]     # the job runs the same cluster


def test_unknown_files_and_kinds_fail(capsys):
    assert check_kuberay.main([str(ROOT / "README.md")]) == 1
    assert capsys.readouterr().err.startswith(f"{ROOT / 'README.md'}: ")
    assert check_kuberay.main([]) == 1


def _head(d):
    return d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker(d, i):
    return d["spec"]["workerGroupSpecs"][i]


def _job_worker(d, i):
    return d["spec"]["rayClusterSpec"]["workerGroupSpecs"][i]


def _entrypoint(d, old, new):
    d["spec"]["entrypoint"] = d["spec"]["entrypoint"].replace(old, new)


H = "spec.headGroupSpec.template.spec.containers[0]"
T0 = "spec.workerGroupSpecs[0].template.spec"
BREAKS = [  # name, manifest, mutation, the one expected line after "FILE: "
    ("wrong type", CLUSTER, lambda d: _head(d)["ports"][0].update(containerPort="6379"),
     f"{H}.ports[0].containerPort: expected integer, got string '6379'"),
    ("wrong type in RayJob", JOB, lambda d: d["spec"].update(entrypointNumGpus="1"),
     "spec.entrypointNumGpus: expected number, got string '1'"),
    ("unknown field", CLUSTER, lambda d: _worker(d, 0)["template"]["spec"]["containers"][0].update(volumeMount=[]),
     f"{T0}.containers[0].volumeMount: unknown field, not in the KubeRay v1.5.1 RayCluster schema "
     f"(did you mean 'volumeMounts'?)"),
    ("unknown field in toleration", CLUSTER, lambda d: _worker(d, 0)["template"]["spec"]["tolerations"][0]
     .update(efect="NoSchedule"), f"{T0}.tolerations[0].efect: unknown field, not in the KubeRay v1.5.1 "
                                  f"RayCluster schema (did you mean 'effect'?)"),
    ("missing required field", CLUSTER, lambda d: _head(d)["ports"][0].pop("containerPort"),
     f"{H}.ports[0].containerPort: required field is missing (KubeRay v1.5.1 RayCluster schema)"),
    ("bad enum", CLUSTER, lambda d: d["spec"]["autoscalerOptions"].update(version="v3"),
     "spec.autoscalerOptions.version: 'v3' is not one of v1, v2"),
    ("bad enum in RayJob", JOB, lambda d: d["spec"].update(deletionStrategy={
        "onSuccess": {"policy": "DeleteAll"}, "onFailure": {"policy": "DeleteCluster"}}),
     "spec.deletionStrategy.onSuccess.policy: 'DeleteAll' is not one of DeleteCluster, DeleteWorkers, DeleteSelf, "
     "DeleteNone"),
    ("duplicate list-map key", CLUSTER, lambda d: _head(d)["ports"][1].update(containerPort=6379),
     f"{H}.ports[1]: duplicate containerPort=6379, protocol=TCP (also item 0)"),
    ("entrypoint config missing", JOB, lambda d: _entrypoint(d, "tiny_deltanet_mid", "tiny_deltanet_mdi"),
     "spec.entrypoint: --config /app/configs/tiny_deltanet_mdi.yaml is not in this repo "
     "(configs/tiny_deltanet_mdi.yaml missing)"),
    ("entrypoint override", JOB, lambda d: _entrypoint(d, "learner.num_ranks", "learner.num_rankz"),
     "spec.entrypoint: unknown config key 'learner.num_rankz' (did you mean 'num_ranks'?)"),
    ("bundle fits no group", JOB, lambda d: _job_worker(d, 0)["rayStartParams"].update(
        resources='"{\\"refine_rollout\\": 8}"'),
     "spec.entrypoint: expected a worker group with {'GPU': 1.0, 'refine_learner': 1.0} per node for the config's "
     "placement bundles (advertised: learner: GPU=8 {'refine_rollout': 8.0}, rollout: GPU=8 {'refine_rollout': "
     "8.0}, aux: GPU=2 {'refine_aux': 2.0})"),
    ("bundles exceed max nodes", JOB, lambda d: _entrypoint(d, "refine_learner=1", "refine_learner=5"),
     "spec.entrypoint: the bundles ask for refine_learner=40 in all, expected <= what the worker groups' "
     "maxReplicas nodes advertise, 32"),
    ("rayStartParams labels", CLUSTER, lambda d: _worker(d, 1)["rayStartParams"].update(labels="refine-group=x"),
     "spec.workerGroupSpecs[1].rayStartParams.labels: expected the group's own labels field (KubeRay >= 1.5.0 "
     "refuses the spec with rayStartParams labels)"),
]
KEPT = [  # the old validator's checks that a run needs and the schema does not state
    ("duplicate group name", CLUSTER, lambda d: _worker(d, 2).update(groupName="rollout"),
     "spec.workerGroupSpecs[2].groupName: expected a name of its own, 'rollout' is also spec.workerGroupSpecs[1]'s"),
    ("min > max replicas", JOB, lambda d: _job_worker(d, 1).update(minReplicas=9),
     "spec.rayClusterSpec.workerGroupSpecs[1].maxReplicas: expected >= minReplicas 9, got 8 (KubeRay would run "
     "maxReplicas pods)"),
    ("num-gpus over the GPU limit", CLUSTER, lambda d: _worker(d, 2)["rayStartParams"].update({"num-gpus": "4"}),
     "spec.workerGroupSpecs[2].rayStartParams.num-gpus: expected a number <= the Ray container's nvidia.com/gpu "
     "limit 2, got '4'"),
    ("bad quantity", CLUSTER, lambda d: _worker(d, 0)["template"]["spec"]["containers"][0]["resources"]["limits"]
     .update(memory="480GB"), f"{T0}.containers[0].resources.limits.memory: '480GB' is not a Kubernetes quantity "
                              f"such as '8', '500m' or '32Gi'"),
    ("claim not ReadWriteMany", PVC, lambda d: d["spec"].update(accessModes=["ReadWriteOnce"]),
     "spec.accessModes: expected ReadWriteMany among ['ReadWriteOnce'] (Ray pods on several nodes mount the claim)"),
]


@pytest.mark.parametrize("manifest,mutate,expected", [b[1:] for b in BREAKS + KEPT],
                         ids=[b[0] for b in BREAKS + KEPT])
def test_broken_manifest_fails_with_one_line(tmp_path, capsys, manifest, mutate, expected):
    doc = copy.deepcopy(_raw(manifest))
    mutate(doc)
    path = tmp_path / manifest.name
    path.write_text(yaml.safe_dump(doc))
    assert check_kuberay.main([str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [f"{path}: {expected}"]


def test_schema_is_read_as_the_api_server_reads_it():
    """Objects with listed properties are closed, maps stay open; the stored file itself is unchanged."""
    stored = check_kuberay.load_schemas()[("ray.io/v1", "RayCluster")]
    closed = check_kuberay.structural(stored["openAPIV3Schema"])
    worker = closed["properties"]["spec"]["properties"]["workerGroupSpecs"]["items"]
    assert worker["additionalProperties"] is False
    assert worker["properties"]["rayStartParams"]["additionalProperties"] == {"type": "string"}
    assert closed["properties"]["metadata"] == {"type": "object"}                  # ObjectMeta: the server's
    raw = json.loads((KUBERAY / "schemas" / "raycluster.json").read_text())["openAPIV3Schema"]
    assert "additionalProperties" not in raw["properties"]["spec"]["properties"]["workerGroupSpecs"]["items"]


@pytest.mark.parametrize("manifest,where", [(CLUSTER, "spec"), (JOB, "spec.rayClusterSpec")])
def test_ray_version_outside_the_pin_fails(tmp_path, capsys, manifest, where):
    """The image runs the Ray that pyproject.toml pins; a manifest naming another release is one line."""
    doc = copy.deepcopy(_raw(manifest))
    (doc["spec"] if manifest == CLUSTER else doc["spec"]["rayClusterSpec"])["rayVersion"] = "2.9.0"
    path = tmp_path / manifest.name
    path.write_text(yaml.safe_dump(doc))
    assert check_kuberay.main([str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: {where}.rayVersion: expected the Ray version refine-ray pins (ray<2.61,>=2.60, pyproject.toml), "
        f"got '2.9.0'"]


def test_a_failed_worker_group_gives_no_follow_on_line(tmp_path, capsys):
    """A RayJob whose learner group asks for more GPUs than its container has: that one line, not also
    the placement fit against the group as if it advertised no GPU."""
    doc = copy.deepcopy(_raw(JOB))
    _job_worker(doc, 0)["rayStartParams"]["num-gpus"] = "16"
    path = tmp_path / JOB.name
    path.write_text(yaml.safe_dump(doc))
    assert check_kuberay.main([str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: spec.rayClusterSpec.workerGroupSpecs[0].rayStartParams.num-gpus: expected a number <= the Ray "
        f"container's nvidia.com/gpu limit 8, got '16'"]

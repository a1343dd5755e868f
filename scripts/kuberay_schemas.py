"""Regenerate deploy/kuberay/schemas/*.json from KubeRay's published CRDs at a release tag.

    python scripts/kuberay_schemas.py /path/to/kuberay v1.5.1

Reads ``ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml`` at the tag from a git
clone of https://github.com/ray-project/kuberay (``git show TAG:PATH``), takes the ``v1`` version's
``schema.openAPIV3Schema`` unchanged and writes it, with the release, commit and source path, to
``deploy/kuberay/schemas/<kind>.json`` as compact JSON. scripts/check_kuberay.py validates the
manifests against these files.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "deploy" / "kuberay" / "schemas"
CRDS = {"RayCluster": "ray-operator/config/crd/bases/ray.io_rayclusters.yaml",
        "RayJob": "ray-operator/config/crd/bases/ray.io_rayjobs.yaml"}
VERSION = "v1"


def main(repo: str, tag: str) -> None:
    """Write one schema file per kind in CRDS; git errors stop with git's message."""
    git = ["git", "-C", repo]
    commit = subprocess.run([*git, "rev-parse", f"{tag}^{{commit}}"], check=True, capture_output=True,
                            text=True).stdout.strip()
    OUT.mkdir(parents=True, exist_ok=True)
    for kind, path in CRDS.items():
        crd = yaml.safe_load(subprocess.run([*git, "show", f"{commit}:{path}"], check=True, capture_output=True,
                                            text=True).stdout)
        assert crd["spec"]["names"]["kind"] == kind, f"{path} defines {crd['spec']['names']['kind']}, not {kind}"
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
        doc = {"kuberay": tag, "commit": commit, "source": path,
               "apiVersion": f"{crd['spec']['group']}/{VERSION}", "kind": kind,
               "openAPIV3Schema": version["schema"]["openAPIV3Schema"]}
        target = OUT / f"{kind.lower()}.json"
        target.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        print(f"{target}: {kind} {doc['apiVersion']} from KubeRay {tag} ({commit[:12]}) {path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/kuberay_schemas.py KUBERAY_GIT_CLONE TAG   (e.g. v1.5.1)")
    main(sys.argv[1], sys.argv[2])

"""``system.dashboard``: a local run's Ray dashboard on 127.0.0.1, behind Ray's token auth, announced
in one line; placement groups named after the run and their roles. A real local cluster started by
``init_ray`` as ``refine-ray train`` starts it."""
import json
import logging
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
from ray.util.placement_group import placement_group_table

from refine_ray.config import load_config
from refine_ray.system.controller import init_ray
from refine_ray.system.placement import Placement

ROOT = Path(__file__).resolve().parents[2]
RAY_CLI = str(Path(sys.executable).with_name("ray"))


def _get(url: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
        return json.load(resp)


def _status(url: str, token: str | None = None) -> int:
    try:
        _get(url, token)
    except urllib.error.HTTPError as e:
        return e.code
    return 200


def _outbound_ip() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
        except OSError:
            return None
        return s.getsockname()[0]


def _named_groups() -> set[str]:
    return {pg["name"] for pg in placement_group_table().values() if pg["state"] == "CREATED"}


@pytest.fixture
def dashboard_cluster(caplog, tmp_path):
    if ray.is_initialized():          # a cluster of another module's fixture: init_ray would join it
        ray.shutdown()
    cfg = load_config(str(ROOT / "configs" / "tiny_deltanet_mid.yaml"),
                      ["system.dashboard=true", f"train.output_dir={tmp_path}"])
    with caplog.at_level(logging.WARNING, logger="refine_ray"):
        init_ray(cfg)
    try:
        yield [r.getMessage() for r in caplog.records if "dashboard" in r.getMessage()]
    finally:
        ray.shutdown()


def test_local_dashboard_on_loopback_with_token_auth_and_named_placement_groups(dashboard_cluster):
    (line,) = dashboard_cluster
    url = re.fullmatch(r"Ray dashboard: (http://127\.0\.0\.1:\d+) \(token auth: .*`ray get-auth-token`.*\)", line)
    assert url, line
    url = url.group(1)
    token = subprocess.run([RAY_CLI, "get-auth-token"], capture_output=True, text=True, check=True).stdout.strip()
    assert token and token not in line                                  # the token is never printed
    assert _status(f"{url}/api/version") == 401                          # no token: refused
    assert _status(f"{url}/api/version", "not-the-token") == 403
    assert _get(f"{url}/api/version", token)["ray_version"] == ray.__version__
    host_ip = _outbound_ip()
    if host_ip and not host_ip.startswith("127."):                      # bound to loopback only
        with pytest.raises(OSError):
            socket.create_connection((host_ip, int(url.rsplit(":", 1)[1])), timeout=3).close()

    base = ["name=exp-a", "reference.enabled=true"]
    colocated = Placement(load_config(str(ROOT / "configs" / "tiny_deltanet_mid.yaml"), base))
    try:
        assert _named_groups() == {"exp-a:learner+scorer+rollout+reward+reference"}
    finally:
        colocated.remove()
    apart = Placement(load_config(str(ROOT / "configs" / "tiny_deltanet_mid.yaml"),
                                  base + ["system.placement=disaggregated", "learner.gpus_per_rank=0.25",
                                          "scorer.gpus_per_actor=0.25", "rollout.gpus_per_actor=0.25",
                                          "reward.gpus_per_actor=0.25", "reference.gpus_per_actor=0.25"]))
    try:
        assert _named_groups() == {f"exp-a:{role}" for role in ("learner", "scorer", "rollout", "reward", "reference")}
    finally:
        apart.remove()

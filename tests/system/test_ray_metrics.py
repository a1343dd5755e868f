"""RayMetricsExporter against a real local Ray: values show up on the node's Prometheus endpoint."""
import re
import shutil
import tempfile
import time
import urllib.request
import uuid

import pytest
import ray

from refine_ray.system.ray_metrics import HEADLINE, RayMetricsExporter, prometheus_name


def test_prometheus_names():
    assert prometheus_name("reward/mean") == "refine_reward_mean"
    assert prometheus_name("time/step_s") == "refine_time_step_s"
    assert prometheus_name("Loss") == "refine_loss"
    names = {prometheus_name(k) for k in HEADLINE}
    assert len(names) == len(HEADLINE)
    assert all(re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", n) for n in names)
    with pytest.raises(ValueError, match="nothing left"):
        prometheus_name("//")


def test_needs_ray_init():
    if ray.is_initialized():
        pytest.skip("ray already initialised by another test")
    with pytest.raises(RuntimeError, match="ray.init"):
        RayMetricsExporter("x")


@pytest.fixture(scope="module")
def local_ray():
    tmp = tempfile.mkdtemp(prefix="rrm_", dir="/tmp")
    ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    try:
        yield ray._private.worker.global_worker.node.metrics_export_port
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _value(body: str, name: str, run: str):
    for line in body.splitlines():
        if line.startswith(name + "{") and f'run="{run}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_values_reach_prometheus_endpoint(local_ray):
    port = local_ray
    assert port and ray.nodes()[0]["MetricsExportPort"] == port
    run = f"t{uuid.uuid4().hex[:8]}"
    exporter = RayMetricsExporter(run)
    step = {"loss": 2.5, "train_cuts/reward_mean": 0.625, "time/step_s": 1.75, "samples": 16.0,
            "unknown/key": 9.0, "version": 3.0, "kl": float("nan")}
    assert exporter.record(step) == 3          # loss, train_cuts/reward_mean, time/step_s; nan and unknown ignored
    assert exporter.record({"loss": 2.0, "samples": 16.0}) == 1
    want = {"ray_refine_loss": 2.0, "ray_refine_train_cuts_reward_mean": 0.625, "ray_refine_time_step_s": 1.75,
            "ray_refine_steps_total": 2.0, "ray_refine_samples_total": 32.0}
    got: dict = {}
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        body = _scrape(port)
        got = {name: _value(body, name, run) for name in want}
        if got == want:
            break
        time.sleep(1.0)
    assert got == want
    assert _value(body, "ray_refine_kl", run) is None       # never set (nan was skipped)
    assert "ray_refine_unknown_key" not in body

"""scripts/submit_job.py against a real `ray start --head` on loopback (its own temp dir and ports,
Ray's token auth on): a job given a relative train.val_path trains and succeeds; path-typed fields
come from the config's types and are made absolute; every virtualenv and cache folder stays out of
the upload, whose size --dry-run prints (measured with Ray's own packaging)."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "submit_job.py"
RAY_CLI = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports from the kernel's ephemeral range (outside Ray's worker ports 10002-19999)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes_of(temp_dir: str) -> list[int]:
    """Ids of the head's processes: those whose command line names ``temp_dir`` (GCS, raylet,
    dashboard, monitors, which `ray start` detaches) and their descendants (agents, workers, whose
    titles Ray rewrites)."""
    parent, roots = {}, []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    roots.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    found = set(roots)
    while True:
        more = {pid for pid, ppid in parent.items() if ppid in found} - found
        if not more:
            return sorted(found)
        found |= more


def _stop(temp_dir: str) -> None:
    """Stop this head only (`ray stop` would stop every Ray of this user on the machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _processes_of(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline and _processes_of(temp_dir):
            time.sleep(0.2)


@pytest.fixture(scope="module")
def head():
    """A head started as docs/operations.md says, on loopback, with ports and a temp dir of its own."""
    temp_dir = tempfile.mkdtemp(prefix="rsj_", dir="/tmp")      # short: Ray's socket paths have a length limit
    gcs, dashboard, agent, metrics, client = _free_ports(5)
    cmd = [RAY_CLI, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
           "--ray-client-server-port", str(client), "--num-cpus", "8", "--num-gpus", "2",
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _stop(temp_dir)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def _submit(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


TINY = ["--config", "configs/tiny_deltanet_mid.yaml", "data.max_length=160", "refine.n_chunks=2",
        "refine.response_length=4", "learner.num_ranks=1", "learner.gpus_per_rank=0.4", "scorer.gpus_per_actor=0.15",
        "rollout.gpus_per_actor=0.15", "reward.gpus_per_actor=0.15", "train.steps=1", "train.val_every=1",
        "train.val_docs=1", "train.val_cuts=2"]


@pytest.mark.slow
def test_a_job_given_relative_paths_trains_on_the_cluster(head, tmp_path):
    """The same relative paths that work for a local run (val_path was missing from the old hand
    list: the job failed on the cluster with 'train.val_path: ... does not exist'). Slow: a head,
    a job and its actors start (~150 s on a busy 2-core machine)."""
    run = Path(os.path.relpath(tmp_path / "run", ROOT))
    result = _submit("--address", head, "--follow", *TINY, "train.val_path=../shared/data/longbench/qmsum_16384.parquet",
                     f"train.output_dir={run}", cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "SUCCEEDED" in result.stdout
    entrypoint = next(line for line in result.stdout.splitlines() if "entrypoint:" in line)
    assert f"train.val_path={(ROOT / '../shared/data/longbench/qmsum_16384.parquet').resolve()}" in entrypoint
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["val/ntp_loss"] > 0


def _dry_run(script: Path, *args: str, cwd: Path) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, str(script), "--dry-run", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    head, _, tail = result.stdout.rpartition("}")
    return json.loads(head + "}"), tail.strip()


def test_every_path_typed_field_goes_to_the_job_absolute(tmp_path, monkeypatch):
    """Relative paths for every path-typed field (from another directory than the repo), as
    refine-ray train reads them there; the old hand list missed val_path, resume_from, encoder."""
    from refine_ray.config import load_config, path_fields

    for name in ("m", "t", "e", "r"):
        (tmp_path / name).mkdir()
    for name in ("a.parquet", "b.parquet", "v.parquet"):
        (tmp_path / name).write_bytes(b"")
    relative = ["model.path=m", "tokenizer.path=t", "data.path=[a.parquet, b.parquet]", "train.output_dir=o",
                "train.resume_from=r", "train.val_path=v.parquet", "reward.encoder=e"]
    plan, _ = _dry_run(SCRIPT, "--config", str(ROOT / "configs" / "tiny_deltanet_mid.yaml"), *relative, cwd=tmp_path)
    entrypoint = plan["entrypoint"]
    monkeypatch.chdir(tmp_path)
    fields = path_fields(load_config(str(ROOT / "configs" / "tiny_deltanet_mid.yaml"), relative))
    assert len(fields) == 7
    for key, value in fields.items():
        want = json.dumps(value) if isinstance(value, list) else value
        assert all(Path(v).is_absolute() for v in (value if isinstance(value, list) else [value])), key
        assert f"{key}={want}" in entrypoint or f"'{key}={want}'" in entrypoint, (key, entrypoint)
    assert "system.ray_address=auto" in entrypoint


def test_dry_run_size_leaves_out_every_virtualenv_and_cache(tmp_path):
    """A copy of the repo gains a 4.5 GB-style venv (here 3 MiB of random bytes each) under names
    only a robust search finds; the upload Ray would send does not grow. A file that belongs to the
    repo does make it grow, so the measure is real."""
    repo = tmp_path / "repo"
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (repo / rel).write_bytes((ROOT / rel).read_bytes())
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    script, args = repo / "scripts" / "submit_job.py", ["--config", "configs/tiny_deltanet_mid.yaml"]
    before, line = _dry_run(script, *args, cwd=repo)
    assert line.startswith("upload: ") and "MiB zipped" in line
    junk = {".venv-vllm/lib/big.bin": "venv", "myenv/lib/big.bin": "venv", "tools/sub/.cache/big.bin": None,
            "notes/.ipynb_checkpoints/big.bin": None, "web/node_modules/big.bin": None, "outputs/run/big.bin": None}
    for rel, kind in junk.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(os.urandom(3 << 20))
        if kind == "venv":
            (repo / rel.split("/")[0] / "pyvenv.cfg").write_text("home = /usr/bin\n")
    after, _ = _dry_run(script, *args, cwd=repo)
    assert after["upload"] == before["upload"]
    assert "/myenv" in after["runtime_env"]["excludes"]
    (repo / "refine_ray" / "blob.bin").write_bytes(os.urandom(1 << 20))
    grown, _ = _dry_run(script, *args, cwd=repo)
    assert grown["upload"]["bytes"] > before["upload"]["bytes"] + (1 << 20) - 4096
    assert grown["upload"]["files"] == before["upload"]["files"] + 1

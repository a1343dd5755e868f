"""The prepared GPU acceptance run is tested code (issue 23 point 6).

``bash scripts/gpu_check.sh --cpu-smoke`` runs the same driver, parts, subprocesses, time budgets
and JSON report as the GPU run, on CPU at tiny sizes (kernel parity with the torch path on both
sides; the single-process REFINE step of a tiny DeltaNet with checkpointing off and on).
``--prepare`` builds the carried folder the device run imports fla from.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHON=sys.executable, **env))


def test_cpu_smoke_writes_one_report_with_every_part(tmp_path):
    out = tmp_path / "report" / "gpu_check.json"
    proc = _run("--cpu-smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["gpu_check.json"]       # one JSON, nothing beside
    report = json.loads(out.read_text())
    assert report["ok"] and report["cpu_smoke"] and not report["missing"] and not report["parity_failures"]
    assert list(report["parts"]) == ["parity_delta_net", "refine_step", "parity_gated_deltanet", "parity_lact"]
    for name, part in report["parts"].items():
        assert part["rc"] == 0 and not part["timed_out"], name
    checks = {(c["family"], c["check"]) for n, p in report["parts"].items() if n.startswith("parity_")
              for c in p["result"]["checks"]}
    for family in ("delta_net", "gated_deltanet"):    # prefix-shared states, with gradients through them
        assert (family, "grads through kept states torch vs fla (rel)") in checks
    assert ("lact", "segment carry grads (fla path, rel)") in checks
    step = report["parts"]["refine_step"]["result"]
    assert step["refine"] == dict(n_chunks=8, samples_per_prefix=1, response_length=5, reward="cosine",
                                  reward_source="policy", prefix_sharing=True)        # configs/base/paper.yaml
    for setting in ("checkpointing_off", "checkpointing_on"):
        s = step["settings"][setting]
        assert len(s["ntp_s"]) == len(s["refine_s"]) == step["reps"] and s["refine_over_ntp"] > 0
        assert "plan_gib" in s                       # the memory plan's slot (issue 23 point 4)


def test_prepare_carries_fla_and_einops_under_60_mib(tmp_path):
    proc = _run("--prepare")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    carry = ROOT / ".gpu_carry"
    assert (carry / "fla" / "ops" / "delta_rule").is_dir() and (carry / "einops" / "__init__.py").is_file()
    assert not list(carry.rglob("__pycache__"))
    assert sum(f.stat().st_size for f in carry.rglob("*") if f.is_file()) < 60 * 2**20
    assert 'run(command="bash scripts/gpu_check.sh", carry=[".gpu_carry"]' in proc.stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu_carry/fla/__init__.py"], cwd=ROOT)
    assert ignored.returncode == 0, ".gpu_carry must be git-ignored (it travels as a carry path)"

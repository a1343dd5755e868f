"""What a user sees and keeps, from real `refine-ray` processes (issue 20 points 2, 4, 5).

The README's tiny job, run through ``scripts/train.sh`` from a folder of its own (its YAML, its
parquet, relative paths): the console shows phase lines, the progress bar and ``done:`` (the
known third-party warnings are in ``run.log`` instead); a real SIGINT to the process group, as a
terminal's Ctrl-C sends it, during start-up, training or ``refine-ray eval`` gives one line and
exit code 130, leaves no process behind, and running the same command again resumes.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from refine_ray.config import load_config
from refine_ray.system import run_dir
from refine_ray.system.run_log import is_noise

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data" / "longbench"
PHASE = re.compile(r"^\[\s*\d+\.\d+s\] ")
BAR = re.compile(r"\d+/\d+ \[")


def run_cli(cmd: list[str], cwd: Path, interrupt_at: str = None, timeout: float = 600) -> tuple[list[str], int, int]:
    """Run ``cmd`` in a session of its own; with ``interrupt_at`` (a regex), SIGINT its process group
    when the console shows it. Returns (console pieces split at newlines and carriage returns,
    exit code, process group id)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    text, sent, start = "", False, time.monotonic()
    while chunk := os.read(proc.stdout.fileno(), 65536):
        text += chunk.decode(errors="replace")
        if interrupt_at and not sent and re.search(interrupt_at, text, re.M):
            os.killpg(proc.pid, signal.SIGINT)
            sent = True
        if time.monotonic() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{cmd} ran longer than {timeout} s:\n{text[-3000:]}")
    rc = proc.wait()
    assert not interrupt_at or sent, f"never saw {interrupt_at!r}:\n{text[-3000:]}"
    return [p for p in re.split(r"[\r\n]", text) if p.strip()], rc, proc.pid


def leftovers(pgid: int, run_log: Path, wait_s: float = 30.0) -> list[str]:
    """Processes of that run still alive after ``wait_s``: its process group (Ray's GCS and raylet)
    or any process with the run's log in its environment (every Ray worker of the job)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(p.pid) == pgid or p.environ().get("REFINE_RUN_LOG") == str(run_log):
                    alive.append(" ".join(p.info["cmdline"] or [])[:120])
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(1)


def one_interrupt_line(pieces: list[str]) -> str:
    """The console after Ctrl-C: the lines it had, then exactly one ``refine-ray: interrupted`` line."""
    text = "\n".join(pieces)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    lines = [p for p in pieces if p.startswith("refine-ray:")]
    assert len(lines) == 1 and pieces[-1] == lines[0], text
    assert "run the same command to resume" in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def workdir(tmp_path):
    """A folder unrelated to the repository: its own config (starting from the tiny config by a
    relative ``defaults:`` include) and its own parquet, both named relative to it."""
    table = pq.read_table(SHARED / "gov_report_16384.parquet").slice(0, 6).select(["prompt"])
    pq.write_table(table, tmp_path / "docs.parquet")
    include = os.path.relpath(ROOT / "configs" / "tiny_deltanet_mid.yaml", tmp_path)
    (tmp_path / "exp.yaml").write_text(
        f"defaults: [{include}]\n"
        "data: {path: docs.parquet, max_length: 160}\n"
        "refine: {n_chunks: 2, response_length: 4}\n"
        "learner: {num_ranks: 1, gpus_per_rank: 0.25}\n"
        "train: {output_dir: runs/tiny, steps: 3, save_every: 1}\n")
    return tmp_path


def test_tiny_run_from_its_own_folder_ctrl_c_resume_and_a_quiet_console(workdir):
    cmd = ["bash", str(ROOT / "scripts" / "train.sh"), "--config", "exp.yaml"]
    out = workdir / "runs" / "tiny"

    pieces, rc, pgid = run_cli(cmd, workdir, interrupt_at=r"\| 2/3 \[")         # Ctrl-C during training
    line = one_interrupt_line(pieces)
    assert rc == 130
    latest = (out / "checkpoints" / "latest").read_text().strip()        # step 1, or 2 if its save was done
    saved = int(re.search(r"(\d+)$", latest).group(1))
    assert re.search(rf"interrupted at step [23] of 3; last checkpoint '.*{latest}'", line), line
    assert not leftovers(pgid, out / "run.log")

    pieces, rc, pgid = run_cli(cmd, workdir)                                      # the same command resumes
    assert rc == 0, "\n".join(pieces)
    assert not leftovers(pgid, out / "run.log")
    console = [p for p in pieces if not BAR.search(p)]
    phases = [p for p in console if PHASE.match(p)]
    others = [p for p in console if not PHASE.match(p) and not p.startswith("done:")]
    assert console[-1].startswith(f"done: {3 - saved} steps"), console       # nothing after done:
    for needle in ("inputs checked", "Ray up", "1 learner rank ready", "inference actors ready (scorer 1, rollout 1, "
                   "reward 1)", f"resuming after step {saved} of 3", "first step done"):
        assert any(needle in p for p in phases), (needle, phases)
    assert len(others) <= 2 and not any(is_noise(p) for p in others), others
    steps = [json.loads(row)["step"] for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    log = (out / "run.log").read_text()
    for noise in ("Triton is not supported on current platform", "Setting accelerator to CPU",
                  "Started a local Ray instance"):
        assert noise in log, noise                                          # filtered, not lost
    assert "interrupted at step" in log and "done: " in log and "first step done" in log
    stored = json.loads((out / "config.json").read_text())
    assert stored["data"]["path"] == str(workdir / "docs.parquet") and stored["train"]["output_dir"] == str(out)


def test_ctrl_c_while_starting(workdir, monkeypatch):
    cmd = ["bash", str(ROOT / "scripts" / "train.sh"), "--config", "exp.yaml"]
    pieces, rc, pgid = run_cli(cmd, workdir, interrupt_at=r"\] Ray up")
    line = one_interrupt_line(pieces)
    assert rc == 130 and line == ("refine-ray: interrupted at step 0 of 3; no checkpoint yet; "
                                  "run the same command to resume"), line
    assert not leftovers(pgid, workdir / "runs" / "tiny" / "run.log")
    monkeypatch.chdir(workdir)                  # what the same command does with what was left: start over
    assert run_dir.plan_start(load_config("exp.yaml")) == run_dir.Plan(resume_from=None, replace=True)


@pytest.mark.slow
def test_ctrl_c_during_eval_keeps_the_answers_and_the_same_command_resumes(tmp_path):
    cmd = [str(ROOT / ".venv" / "bin" / "refine-ray"), "eval", "--config", str(ROOT / "configs" / "ttt_tiny_longbench.yaml"),
           "--model", "tiny:delta_net", "--data", str(SHARED / "trec_16384.parquet"), "--limit", "6",
           "--max-prompt-tokens", "128", "--max-gen-tokens", "4", "--out", "r.json"]
    pieces, rc, _ = run_cli(cmd, tmp_path, interrupt_at=r"\| 2/6 \[")
    line = one_interrupt_line(pieces)
    assert rc == 130 and "the answers given so far are saved for --out 'r.json'" in line, line
    kept = (tmp_path / "r.predictions.jsonl").read_text().splitlines()
    assert len(kept) >= 1 and not (tmp_path / "r.json").exists()         # saved as each batch ends

    pieces, rc, _ = run_cli(cmd, tmp_path)
    assert rc == 0, "\n".join(pieces)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["meta"]["resumed_rows"] == len(kept)
    assert len((tmp_path / "r.predictions.jsonl").read_text().splitlines()) == 6


def test_torch_deprecation_warnings_that_zero_triggers_are_noise(tmp_path):
    """ZeRO-2/3 call torch.distributed.all_gather_into_tensor and reduce_scatter_tensor, which warn
    (FutureWarning) in every learner rank: both warnings, as torch emits them, go to the run log only."""
    script = (
        "import warnings, torch, torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    dist.all_gather_into_tensor(torch.zeros(2), torch.ones(2))\n"
        "    dist.reduce_scatter_tensor(torch.zeros(2), torch.ones(2))\n"
        "for w in seen:\n"
        "    print(repr(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    texts = [eval(line) for line in out.stdout.splitlines()]
    assert len(texts) == 2 and all("is deprecated" in t for t in texts), texts
    assert all(is_noise(t) for t in texts), texts

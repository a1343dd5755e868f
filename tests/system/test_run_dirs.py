"""A run directory belongs to one run; checkpoints are verified and never unpickled.

Real `refine-ray train` runs on a local Ray cluster (tiny DeltaNet, one DeepSpeed rank on gloo):
a fresh start into an old run refuses, overwrite replaces it consistently, a second run into a
locked directory refuses (a dead holder's lock is reclaimed), flipped or truncated checkpoint
bytes and a checkpoint from another model size are caught before Ray work starts, a pickle
payload is never executed by train or export, and train.resume_from picks a checkpoint.
"""
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refine_ray.transport import checkpoint as ckpt
from refine_ray.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", str(ROOT / "configs" / "tiny_deltanet_mid.yaml"), "data.max_length=160", "refine.n_chunks=2",
        "refine.response_length=4", "learner.num_ranks=1", "learner.gpus_per_rank=0.4",
        "scorer.gpus_per_actor=0.15", "rollout.gpus_per_actor=0.15", "reward.gpus_per_actor=0.15"]


def train(run, *extra):
    return main(["train", *TINY, f"train.output_dir={run}", *extra])


def tree(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def old_run(cluster, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("old") / "run"
    assert train(run, "train.steps=2", "train.save_every=1") == 0
    return run


@pytest.fixture
def run(old_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(old_run, copy)
    return copy


def test_fresh_start_into_an_old_run_refuses(run, capsys):
    before = tree(run)
    assert train(run, "train.resume=false") == 2
    one_line_error(capsys, "already holds a run", "train.overwrite=true")
    assert tree(run) == before
    assert train(run, "model.hidden_size=32") == 2                       # resume with another model size
    one_line_error(capsys, "model.hidden_size=64", "32")
    assert tree(run) == before
    assert train(run, "train.steps=2") == 0                             # the same run: nothing left to do
    assert "nothing to do" in capsys.readouterr().out


def test_lock_refuses_a_second_run_and_overwrite_replaces(run, capsys):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from refine_ray.system.run_dir import RunDirLock; RunDirLock(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(600)"), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(run)
        assert train(run, "train.overwrite=true") == 2
        one_line_error(capsys, "in use by another run", f"pid {holder.pid}")
        assert tree(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").is_file()                                     # the dead holder's lock is left behind
    assert train(run, "train.overwrite=true", "train.steps=1") == 0    # ... and reclaimed
    assert "removed the previous run" in capsys.readouterr().out
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]      # nothing moved aside is left
    assert ckpt.latest_checkpoint(run).name == "step_000001"
    assert [p.name for p in ckpt.completed_checkpoints(run)] == ["step_000001"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]                         # step N: after N training steps
    assert main(["export", "--from", str(run), "--out", str(run.parent / "hf")]) == 0


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_is_caught_before_resume_and_export(run, capsys, damage):
    victim = run / "checkpoints" / "step_000002" / "learner" / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:len(data) // 2]
    victim.write_bytes(bytes(data))
    before = tree(run)
    assert train(run, "train.steps=3") == 2
    one_line_error(capsys, "learner/ds/mp_rank_00_model_states.pt", "train.resume_from=", "step_000001")
    assert main(["export", "--from", str(run), "--out", str(run.parent / "hf")]) == 2
    one_line_error(capsys, "mp_rank_00_model_states.pt", "export it with --from", "step_000001")
    assert tree(run) == before and not (run.parent / "hf").exists()
    if damage == "flip":      # the suggested way out works: resume from the previous checkpoint
        good = run / "checkpoints" / "step_000001"
        assert train(run, "train.steps=2", f"train.resume_from={good}") == 0
        assert ckpt.latest_checkpoint(run).name == "step_000002"
        ckpt.verify_checkpoint(ckpt.latest_checkpoint(run))


class Payload:
    """Unpickling this would create a marker file: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_never_executed(run, capsys, tmp_path):
    marker = tmp_path / "payload-ran"
    step = run / "checkpoints" / "step_000002"
    victim = step / "learner" / "ds" / "mp_rank_00_model_states.pt"
    states = torch.load(victim, weights_only=True)
    states["client_state_hook"] = Payload(str(marker))
    torch.save(states, victim)
    manifest = json.loads((step / ckpt.MANIFEST).read_text())    # an attacker rewrites the manifest too
    manifest["files"]["learner/ds/mp_rank_00_model_states.pt"] = {
        "bytes": victim.stat().st_size, "sha256": hashlib.sha256(victim.read_bytes()).hexdigest()}
    (step / ckpt.MANIFEST).write_text(json.dumps(manifest))
    (step / "trainer.pt").write_bytes(victim.read_bytes())         # a pickled trainer state is never read
    assert train(run, "train.steps=3") == 2
    one_line_error(capsys, "refusing a checkpoint that could run code")
    assert main(["export", "--from", str(step), "--out", str(tmp_path / "hf")]) == 2
    one_line_error(capsys, "could run code")
    with pytest.raises(Exception, match="Unsupported global"):       # also refused below the scan
        with ckpt.weights_only_loading():
            torch.load(victim, weights_only=False)
    time.sleep(0.1)
    assert not marker.exists()


def test_pruning_keeps_the_checkpoint_latest_names(tmp_path):
    """Higher-numbered checkpoints (an abandoned branch after resume_from) never push out the new one."""
    for step in (5, 6):                       # left by a longer earlier trajectory
        tmp, final = ckpt.begin_save(tmp_path, step)
        ckpt.commit_save(tmp, final, {"step": step}, keep=1)
    tmp, final = ckpt.begin_save(tmp_path, 2)
    (tmp / "learner").mkdir()
    ckpt.commit_save(tmp, final, {"step": 2}, keep=1)
    assert ckpt.latest_checkpoint(tmp_path) == final and final.is_dir()
    ckpt.verify_checkpoint(final)
    tmp, final3 = ckpt.begin_save(tmp_path, 3)
    ckpt.commit_save(tmp, final3, {"step": 3}, keep=1)
    assert [p.name for p in ckpt.completed_checkpoints(tmp_path)] == ["step_000003", "step_000006"]


def test_out_of_the_way_cases(run, capsys, tmp_path):
    """Export never replaces the run it reads; overwrite + resume_from replaces the old run whole;
    malformed manifest entries and trainer state are one line; '.' is never replaced."""
    before = tree(run)
    for out in (run, run / "checkpoints", run.parent):
        assert main(["export", "--from", str(run), "--out", str(out), "--overwrite"]) == 2
        one_line_error(capsys, "is or holds the source")
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("")
    assert main(["export", "--from", str(run), "--out", str(other), "--overwrite"]) == 2
    one_line_error(capsys, "is a training run directory")
    assert tree(run) == before
    step = run / "checkpoints" / "step_000002"
    manifest = json.loads((step / ckpt.MANIFEST).read_text())
    manifest["files"]["trainer.json"] = 5
    (step / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert train(run, "train.steps=3") == 2
    one_line_error(capsys, "manifest.json is unreadable")
    state = json.loads((step / "trainer.json").read_text())
    state["cursor"] = {"bogus": 1}
    with pytest.raises(ckpt.CheckpointError, match="malformed cursor"):
        (step / "trainer.json").write_text(json.dumps(state))
        ckpt.load_trainer_state(step)


def test_overwrite_with_resume_from_another_run_replaces_the_old_run(run, old_run, capsys, monkeypatch, tmp_path):
    (run / "NOTES.md").write_text("mine")
    first = old_run / "checkpoints" / "step_000001"
    assert train(run, "train.overwrite=true", f"train.resume_from={first}", "train.steps=2") == 0
    assert "including NOTES.md" in capsys.readouterr().out
    assert [p.name for p in ckpt.completed_checkpoints(run)] == ["step_000002"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2]
    monkeypatch.chdir(run)             # relative paths are read from the working directory
    data = ROOT.parent / "shared" / "data" / "longbench" / "gov_report_16384.parquet"
    assert train(".", "train.overwrite=true", f"data.path={data}") == 2
    one_line_error(capsys, "working directory")


def test_a_run_stopped_before_its_first_checkpoint_starts_over(run, capsys):
    """'Run the same command again' holds when nothing was saved yet (a crash in step 0)."""
    argv = ["train.steps=1", "data.seed=7"]
    shutil.rmtree(run)
    run.mkdir()
    from refine_ray.config import load_config, to_dict

    cfg = load_config(TINY[1], TINY[2:] + [f"train.output_dir={run}", *argv])
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))    # what the crashed run left
    (run / "metrics.jsonl").write_text("")
    assert train(run, *argv, "data.seed=8") == 2                  # another config: not the same run
    one_line_error(capsys, "already holds a run")
    assert train(run, *argv) == 0
    assert ckpt.latest_checkpoint(run).name == "step_000001"


def _save(run, step: int, payload: bytes, state: dict, keep=None):
    """A checkpoint of ``step`` written into its temporary folder; returns (tmp, final, commit operations)."""
    state = {"version": step, "cursor": {"epoch": 0, "position": step, "skipped": 0}, "failures": 0,
             "pending": None, **state}
    tmp, final = ckpt.begin_save(run, step)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "weights.bin").write_bytes(payload)
    return tmp, final, ckpt.commit_operations(tmp, final, state, None, keep)


def _loadable(run) -> str:
    """The branch of the checkpoint `latest` resolves to, after verifying it against its manifest."""
    found = ckpt.latest_checkpoint(run)
    ckpt.verify_checkpoint(found)
    return ckpt.load_trainer_state(found)["branch"]


def test_resaving_a_step_keeps_a_loadable_checkpoint_at_every_instant(tmp_path):
    """Issue 24 point 9: a run resumed from step 2 of its own directory re-saves step 4, which
    `latest` names. A crash after any operation of the save leaves `latest` naming a complete,
    verifiable checkpoint (the old step 4 or the new one), and the next save cleans up."""
    run = tmp_path / "run"
    for step in (2, 4):
        *_, ops = _save(run, step, b"old %d" % step, {"step": step, "branch": "old"})
        for _, op in ops:
            op()
    tmp, final, ops = _save(run, 4, b"new 4", {"step": 4, "branch": "new"})
    branches = []
    for i, (what, op) in enumerate(ops):
        op()
        crashed = tmp_path / f"crash-{i}"                    # the filesystem as a crash here leaves it
        shutil.copytree(run, crashed, symlinks=True)
        branches.append(_loadable(crashed))
        tmp5, final5, ops5 = _save(crashed, 5, b"next", {"step": 5, "branch": "after"})   # the run goes on
        for _, op5 in ops5:
            op5()
        assert _loadable(crashed) == "after", what
        leftovers = [p.name for p in ckpt.checkpoint_root(crashed).iterdir()
                     if ".tmp-" in p.name or ".replaced-" in p.name]
        assert len(leftovers) <= 1, (what, leftovers)        # at most the folder `latest` named at the crash
    # writing the state and the manifest leaves the old step 4 in place; from `latest` naming the new one on
    assert [w for w, _ in ops][:3] == ["write the trainer state", "write the manifest",
                                       "point latest at the new folder"]
    assert branches == ["old", "old"] + ["new"] * (len(ops) - 2)
    assert sorted(p.name for p in ckpt.checkpoint_root(run).iterdir()) == ["latest", "step_000002", "step_000004"]
    assert (final / "learner" / "weights.bin").read_bytes() == b"new 4" and not tmp.exists()


def test_keep_checkpoints_zero_is_refused_and_null_keeps_all(tmp_path):
    """Also in issue 24: train.keep_checkpoints=0 used to keep every checkpoint silently."""
    from refine_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^train.keep_checkpoints: 0 would keep no checkpoint.*null to keep every"):
        load_config(TINY[1], ["train.keep_checkpoints=0"])
    assert load_config(TINY[1], ["train.keep_checkpoints=null"]).train.keep_checkpoints is None
    for step in range(1, 5):
        *_, ops = _save(tmp_path, step, b"w", {"step": step, "branch": "x"}, keep=None)
        for _, op in ops:
            op()
    assert [ckpt.step_of(p) for p in ckpt.completed_checkpoints(tmp_path)] == [1, 2, 3, 4]
    *_, ops = _save(tmp_path, 5, b"w", {"step": 5, "branch": "x"}, keep=2)
    for _, op in ops:
        op()
    assert [ckpt.step_of(p) for p in ckpt.completed_checkpoints(tmp_path)] == [4, 5]


@pytest.mark.parametrize("change", ["learner.zero_stage=2", "learner.num_ranks=2"])
def test_resume_with_another_zero_stage_or_rank_count_is_refused_before_writing(run, capsys, change):
    """Issue 24 point 12: a DeepSpeed checkpoint of ZeRO-1 on one rank loads neither into ZeRO-2 nor
    into two ranks; preflight says so, naming the field, before config.json or anything is written."""
    before = tree(run)
    extra = ["learner.gpus_per_rank=0.2"] if "num_ranks" in change else []
    assert train(run, "train.steps=3", change, *extra) == 2
    field, value = change.split("=")
    err = one_line_error(capsys, f"was written with {field}=1, this config has {value}", "not supported",
                         f"Resume with {field}=1", "refine-ray export --from")
    assert "step_000002" in err
    assert tree(run) == before


def test_a_resume_with_changed_settings_keeps_what_ran_before(tmp_path):
    """config.json holds the settings of the run from its last start; a resume that changes any
    records the old and new values with the step it resumed at in config_history.jsonl."""
    from refine_ray.config import ExperimentConfig, to_dict
    from refine_ray.system.run_dir import CONFIG_HISTORY, write_config

    first = to_dict(ExperimentConfig())
    assert write_config(tmp_path, first, None) == []
    assert write_config(tmp_path, first, 4) == [] and not (tmp_path / CONFIG_HISTORY).exists()
    second = to_dict(ExperimentConfig())
    second["system"]["weight_sync"], second["train"]["steps"] = "collective", 6
    changes = write_config(tmp_path, second, 4)
    assert changes == ["system.weight_sync: 'object_store' -> 'collective'", "train.steps: 4 -> 6"]
    record = json.loads((tmp_path / CONFIG_HISTORY).read_text())
    assert record == {"step": 4, "changed": {"system.weight_sync": ["object_store", "collective"],
                                             "train.steps": [4, 6]}}
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(second))

"""`refine-ray export`: HF round trips (ours and fla's classes), state-dict / DeepSpeed sources, atomicity."""
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from refine_ray.cli import main
from refine_ray.config import ExperimentConfig, ModelConfig, to_dict
from refine_ray.export import ExportError, export_model, save_atomic
from refine_ray.models import registry
from refine_ray.models.generation import generate

IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 1997, 1996, 4654, 6442, 102]])


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("kind", ["delta_net", "gated_deltanet", "lact"])
def test_export_round_trip(kind, tmp_path, tokenizer, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--from", f"tiny:{kind}", "--out", str(out)]) == 0
    assert f"exported {kind}" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert _siblings(out) == ["hf"]                                 # no temporary directory left
    original = registry.build_model(kind, seed=0, vocab_size=len(tokenizer)).eval()
    ours = registry.load_model(str(out)).eval()
    for k, v in original.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(ours.forward_segment(IDS).logits, original.forward_segment(IDS).logits)
    assert torch.equal(generate(ours, IDS[0], 4), generate(original, IDS[0], 4))
    assert len(AutoTokenizer.from_pretrained(str(out))) == len(tokenizer)
    if kind == "lact":
        import refine_ray.models.lact  # noqa: F401  registers model_type 'lact'
    else:
        import fla  # noqa: F401  registers fla's own classes
    auto, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    if kind != "lact":
        assert type(auto).__module__.startswith("fla."), type(auto)   # fla's class, not ours
    for k, v in original.state_dict().items():
        assert torch.equal(auto.state_dict()[k], v), k


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_gets_the_modes_of_the_users_umask(tmp_path, tokenizer, umask):
    # mkdtemp made the export directory 0700 and safetensors its weights 0600: private to the writer.
    old = os.umask(umask)
    try:
        assert main(["export", "--from", "tiny:delta_net", "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "hf"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = list(out.iterdir())
    assert "model.safetensors" in {f.name for f in files}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


def test_export_state_dict_file_with_run_config(tmp_path, tokenizer):
    run = tmp_path / "outputs" / "run"
    (run / "ckpt").mkdir(parents=True)
    cfg = ExperimentConfig(model=ModelConfig(type="gated_deltanet", hidden_size=32, num_heads=2, seed=3))
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    model = registry.build_model("gated_deltanet", seed=7, vocab_size=len(tokenizer), hidden_size=32, num_heads=2)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, run / "ckpt" / "weights.pt")
    export_model(str(run / "ckpt" / "weights.pt"), tmp_path / "hf")      # run config found two levels up
    back = registry.load_model(str(tmp_path / "hf"))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    bad = ExperimentConfig(model=ModelConfig(type="delta_net"))
    (tmp_path / "bad.json").write_text(json.dumps(to_dict(bad)))
    with pytest.raises(ExportError, match="does not match the run's delta_net architecture"):
        export_model(str(run / "ckpt" / "weights.pt"), tmp_path / "hf2", run_config=str(tmp_path / "bad.json"))
    assert not (tmp_path / "hf2").exists()


def test_failed_export_leaves_nothing(tmp_path, tokenizer, capsys):
    model = registry.build_model("delta_net", seed=0, vocab_size=len(tokenizer))
    out = tmp_path / "parent" / "hf"

    def veto(tmp):
        assert (tmp / "model.safetensors").is_file()                 # fully written, not yet committed
        raise RuntimeError("injected failure before commit")

    with pytest.raises(RuntimeError, match="injected"):
        save_atomic(model, tokenizer, out, check=veto)
    assert _siblings(out) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    capsys.readouterr()
    assert main(["export", "--from", "tiny:delta_net", "--out", str(blocker / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "file' is a file, not a directory" in err
    assert blocker.read_text() == "x"
    save_atomic(model, tokenizer, out)
    stamp = (out / "config.json").read_text()
    with pytest.raises(ExportError, match="already exists"):
        save_atomic(model, tokenizer, out)
    with pytest.raises(RuntimeError):
        save_atomic(model, tokenizer, out, overwrite=True, check=veto)
    assert (out / "config.json").read_text() == stamp and _siblings(out) == ["hf"]   # old export intact
    save_atomic(model, tokenizer, out, overwrite=True)
    assert _siblings(out) == ["hf"]


def test_bad_sources_are_one_line_errors(tmp_path, capsys):
    torch.save({"w": torch.zeros(1)}, tmp_path / "weights.pt")
    for source, needle in (("tiny:mamba", "unknown type"), (str(tmp_path / "nope"), "no such file"),
                           (str(tmp_path), "not a refine-ray checkpoint, and not a DeepSpeed save_dir"),
                           (str(tmp_path / "weights.pt"), "no run config.json found")):
        assert main(["export", "--from", source, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


DS_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from refine_ray.config import ModelConfig
    from refine_ray.refine.policy import build_policy
    deepspeed.init_distributed(dist_backend="gloo")
    model = build_policy(ModelConfig(), int(sys.argv[2]), device="cpu")   # as the learner rank builds it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9})
    out = engine.module.forward_segment(torch.arange(20)[None])
    engine.backward(out.logits.float().square().mean())
    engine.step()
    engine.save_checkpoint(sys.argv[1], tag=sys.argv[4])
    torch.save({k: v.float() for k, v in engine.module.state_dict().items()}, os.path.join(sys.argv[1], "expected.pt"))
""")


def test_export_bare_deepspeed_save_dir(tmp_path, tokenizer):
    # A DeepSpeed save_dir not written by refine-ray (run checkpoints: tests/system/test_export_runs.py);
    # the architecture comes from the run config found in a parent directory.
    run = tmp_path / "run"
    ckpt = run / "ds_save"
    ckpt.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(to_dict(ExperimentConfig())))
    port = str(29500 + (hash(str(tmp_path)) % 400))
    proc = subprocess.run([sys.executable, "-c", DS_SCRIPT, str(ckpt), str(len(tokenizer)), port, "global_step1"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (ckpt / "latest").read_text() == "global_step1"
    expected = torch.load(ckpt / "expected.pt", weights_only=True)
    (ckpt / "expected.pt").unlink()
    model = export_model(str(ckpt), tmp_path / "hf")                 # ZeRO-1: fp32 master weights
    back = registry.load_model(str(tmp_path / "hf"))
    for k, v in expected.items():
        assert torch.equal(back.state_dict()[k], v), k
    fresh = registry.build_model("delta_net", seed=0, vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                 num_heads=2)
    assert not torch.equal(back.state_dict()["lm_head.weight"], fresh.lm_head.weight)   # the step moved it
    # A mismatching architecture is a one-line error, not a torch traceback.
    small = ExperimentConfig(model=ModelConfig(hidden_size=32))
    (tmp_path / "small.json").write_text(json.dumps(to_dict(small)))
    with pytest.raises(ExportError, match="size mismatch"):
        export_model(str(ckpt), tmp_path / "hf2", run_config=str(tmp_path / "small.json"))
    assert model.config.model_type == "delta_net"


def test_export_reads_a_run_config_written_before_the_renames(tmp_path, tokenizer):
    """Runs written before refine.sampling became refine.cut_strategy and the always-on roles lost
    `enabled` still export (the program's own files are upgraded; user YAML is not)."""
    run = tmp_path / "outputs" / "old-run"
    (run / "ckpt").mkdir(parents=True)
    raw = to_dict(ExperimentConfig(model=ModelConfig(type="delta_net", hidden_size=32, num_heads=2, seed=3)))
    raw["refine"]["sampling"] = raw["refine"].pop("cut_strategy")
    for role in ("scorer", "rollout", "reward"):
        raw[role]["enabled"] = True
    (run / "config.json").write_text(json.dumps(raw))
    model = registry.build_model("delta_net", seed=7, vocab_size=len(tokenizer), hidden_size=32, num_heads=2)
    torch.save(model.state_dict(), run / "ckpt" / "weights.pt")
    export_model(str(run / "ckpt" / "weights.pt"), tmp_path / "hf")
    back = registry.load_model(str(tmp_path / "hf"))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_export_command_prints_only_its_line_naming_the_step(tmp_path, tokenizer):
    """`refine-ray export` of a run whose latest checkpoint is step 16 (DeepSpeed ZeRO-1 files committed as
    refine-ray commits them), in a fresh process: stdout is the one final line, naming that step, without
    DeepSpeed's "Setting accelerator to CPU", "Detected checkpoint ..." / "Reconstructed fp32 ..." lines
    (stdout) or its tqdm bars (stderr)."""
    from refine_ray.transport import checkpoint as ckpt

    run = tmp_path / "run"
    tmp, final = ckpt.begin_save(run, 16)
    port = str(29500 + (hash(str(tmp_path)) % 400))
    proc = subprocess.run([sys.executable, "-c", DS_SCRIPT, str(tmp / "learner"), str(len(tokenizer)), port, "ds"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (tmp / "learner" / "expected.pt").unlink()
    ckpt.commit_save(tmp, final, {"step": 16, "version": 16, "cursor": {"epoch": 0, "position": 16, "skipped": 0},
                                  "failures": 0, "pending": None, "config": to_dict(ExperimentConfig())})
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "refine_ray.cli", "export", "--from", str(run), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [f"exported delta_net (4.0M params, float32) from {run} (checkpoint step 16) "
                                        f"to {out}"]
    assert "Loading checkpoint shards" not in proc.stderr and "it/s]" not in proc.stderr, proc.stderr[-2000:]

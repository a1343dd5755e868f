"""The memory plan (issue 23 point 4): ``refine-ray plan``, its accounting, and its activation model
against the measured peak of real learner steps on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refine_ray import cli
from refine_ray.config import load_config
from refine_ray.models import registry
from refine_ray.plan import make_plan, startup_line
from refine_ray.system import memory_plan as mp

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "configs" / "shapes"


def test_activation_model_matches_the_measured_peak(tmp_path):
    """Two model sizes x two lengths x checkpointing off/on: the plan's activations of one learner document
    step are within 25% of the peak-RSS rise of that step measured in a fresh process (the benchmark's
    own measurement: scripts/bench_memory_plan.py)."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_memory_plan.py"), "--reps", "1",
                           "--lengths", "1024", "2048", "--json", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {(r["size"], r["length"], r["checkpointing"]) for r in rows} == {
        (s, L, c) for s in ("a", "b") for L in (1024, 2048) for c in (False, True)}
    bad = [r for r in rows if not 0.75 <= r["ratio"] <= 1.25]
    assert not bad, bad
    on = {(r["size"], r["length"]): r["measured_mib"] for r in rows if r["checkpointing"]}
    off = {(r["size"], r["length"]): r["measured_mib"] for r in rows if not r["checkpointing"]}
    assert all(on[key] < off[key] for key in on)        # the settings differ as the plan says they do


def test_model_states_follow_deepspeed():
    """Ours equals DeepSpeed's own estimator where its assumptions (16-bit weights) hold at ZeRO-2, and
    differs by what it leaves out elsewhere: ZeRO-1's whole gradients, ZeRO-3's 16-bit weight shard."""
    P, largest, N = 10**9, 6 * 10**7, 8
    z2 = mp.deepspeed_estimate(P, largest, 2, N)
    assert sum(mp.model_states(P, largest, 2, 2, N).values()) == z2 == 2 * P + 18 * P // N
    assert sum(mp.model_states(P, largest, 2, 1, N).values()) - z2 == 2 * P - 2 * P // N
    z3 = mp.deepspeed_estimate(P, largest, 3, N)
    assert sum(mp.model_states(P, largest, 2, 3, N).values()) - z3 == 2 * P // N
    assert sum(mp.model_states(P, largest, 4, 0, 1).values()) == 16 * P     # fp32 ZeRO-0: torch AdamW
    assert sum(mp.model_states(P, largest, 2, 0, 1).values()) == 20 * P     # bf16 ZeRO-0: DeepSpeed's wrapper


def test_model_shape_counts_the_model_without_building_it():
    config = registry.tiny_config("delta_net", 512, hidden_size=64, num_hidden_layers=3, num_heads=2)
    shape = mp.model_shape(config)
    model = registry.build_model("delta_net", seed=0, vocab_size=512, hidden_size=64, num_hidden_layers=3,
                                 num_heads=2)
    assert shape.params == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        state = model.forward_segment(torch.zeros(1, 3, dtype=torch.long), None, return_logits=False).state
    assert shape.state_bytes == sum(t.numel() * t.element_size() for layer in state.layers for t in layer.values())


def test_fla_accounting_replaces_our_kernels_saves():
    """On CUDA fla's kernels run: what our reference kernels save inside them is not counted, what fla
    0.6.0's autograd functions save is. A DeltaNet block in bf16, counted by hand from fla's source:
    bf16 [T, D]: the block input and its norm, q/k/v before the convs, q/k l2-normed and v after them, the
    delta rule's output and its norm, the residual and its norm (12); [T, I]: gate, up, their product
    (3); beta [T, H] bf16, A [T, H, 64] bf16; fp32 rstd: two norms' [T], q/k [T, H], the output norm [T, H]."""
    D, H, I, T = 128, 2, 384, 256
    config = registry.tiny_config("delta_net", 512, hidden_size=D, num_hidden_layers=2, num_heads=H,
                                  intermediate_size=I)
    ours, _ = mp.saved_per_block(config, 1, T, torch.bfloat16, "torch")
    fla, _ = mp.saved_per_block(config, 1, T, torch.bfloat16, "fla")
    by_hand = 2 * (12 * D + 3 * I) + 2 * H + 2 * H * 64 + 4 * (2 + 2 * H + H)
    assert fla == T * by_hand
    assert fla < ours / 3                     # our references keep fp32 chunk intermediates for backward


def test_plan_command_on_a_paper_preset(capsys):
    """`refine-ray plan` on a paper preset whose model.path holds only the model's config.json (the
    shipped shapes): the plan per actor and per GPU, 0 when it fits, 1 when it does not."""
    args = ["plan", "--config", str(ROOT / "configs" / "paper_mid_deltanet_1.3b.yaml"),
            f"model.path={SHAPES / 'delta_net-1.3B-100B'}"]
    assert cli.main(args + ["--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "delta_net, 1.37B parameters (hidden 2048, 24 layers, vocab 32000), bfloat16, 16384 tokens" in out[0]
    assert out[1].lstrip().startswith("learner: ") and "ZeRO-1 over 8 ranks" in out[1]
    assert "activations of one 16384-token document" in out[2] and "checkpointing off:" in out[2]
    assert any("GPUs, each: learner + scorer + rollout" in line for line in out)
    assert out[-1].startswith("fits: fullest GPU")
    assert cli.main(args + ["--gpu-memory", "12"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("DOES NOT FIT: fullest GPU")


def test_scorer_holds_one_documents_cut_states():
    """A scorer moves each document's cut states to host memory once it is scored
    (refine.scoring.score_document), so its GPU holds one document's n cut states, not its share
    of the batch (16 documents of LaCT-760M's window-carrying states in the mid-training preset)."""
    cfg = load_config(ROOT / "configs" / "paper_mid_lact_760m.yaml", [f"model.path={SHAPES / 'lact-760m'}"])
    plan = make_plan(cfg, None, 80 * mp.GIB, on_gpu=True, with_deepspeed=False)
    shape = mp.model_shape(mp.model_config(cfg.model, None), torch.bfloat16)
    assert cfg.refine.prefix_sharing and cfg.data.batch_size // cfg.scorer.num_actors == 16
    assert plan.actors["scorer"]["cut_states"] == cfg.refine.n_chunks * shape.state_bytes
    assert "the batch's in host memory (40.55)" in plan.notes["scorer"]


def test_rollout_holds_one_documents_cut_states():
    """The fast-weight rollout engine keeps a batch's cut states in host memory and moves one
    document's to its GPU at a time (serving.rollout_engine.FastWeightEngine): its figure is one
    document's n states plus the n*G sampling states, and the LaCT-760M mid preset fits 80 GiB."""
    cfg = load_config(ROOT / "configs" / "paper_mid_lact_760m.yaml", [f"model.path={SHAPES / 'lact-760m'}"])
    plan = make_plan(cfg, None, 80 * mp.GIB, on_gpu=True, with_deepspeed=False)
    shape = mp.model_shape(mp.model_config(cfg.model, None), torch.bfloat16)
    n, G = cfg.refine.n_chunks, cfg.refine.samples_per_prefix
    assert cfg.data.batch_size // cfg.rollout.num_actors == 16
    assert plan.actors["rollout"]["states"] == (n + (n * G if G > 1 else 0)) * shape.state_bytes
    assert plan.fits


def test_plan_command_bad_inputs(capsys, tmp_path):
    """A model path that does not exist, or one without a config.json, and a bad --gpu-memory: one line each."""
    base = ["plan", "--config", str(ROOT / "configs" / "paper_mid_deltanet_1.3b.yaml")]
    assert cli.main(base + ["--gpu-memory", "80"]) == 2          # the preset's checkpoint is not shipped
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.path" in err[0] and "checkpoints/delta_net-1.3B-100B'" in err[0], err
    assert cli.main(base + ["--gpu-memory", "80", f"model.path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.json" in err[0] and str(tmp_path) in err[0]
    assert cli.main(base + ["--gpu-memory", "0", f"model.path={SHAPES / 'delta_net-1.3B-100B'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["refine-ray: --gpu-memory: 0 must be > 0 (GiB per GPU)"]
    if not torch.cuda.is_available():
        assert cli.main(base + [f"model.path={SHAPES / 'delta_net-1.3B-100B'}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("refine-ray: --gpu-memory: required on a machine without CUDA")


def test_startup_line_of_the_main_job():
    """What `refine-ray train` logs after its inputs are checked: per actor, and here (no CUDA) no fit check."""
    cfg = load_config(ROOT / "configs" / "tiny_deltanet_mid.yaml")
    line, fits = startup_line(cfg, 30522)
    assert line.startswith("memory plan (GiB per actor): learner ") and "scorer" in line and "rollout" in line
    if not torch.cuda.is_available():
        assert fits is None and "no CUDA GPU" in line


@pytest.mark.parametrize("preset,shape", [("paper_ttt_lact_760m", "lact-760m"),
                                          ("paper_ttt_deltanet_1.3b", "delta_net-1.3B-100B")])
def test_plan_command_plans_a_ttt_preset_as_eval_ttt(capsys, preset, shape):
    """A test-time-training preset (eval.ttt.mode=refine) without --ttt: the plan of `refine-ray eval --ttt`
    with a note saying so, the same figures as with --ttt (without it, the preset's 4 learner ranks were
    planned as a colocated training layout: "config error: ... GPU shares on bundle 0 add up to 2 > 1")."""
    args = ["plan", "--config", str(ROOT / "configs" / f"{preset}.yaml"), f"model.path={SHAPES / shape}",
            "--gpu-memory", "80"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert captured.err == "" and out[0].startswith("memory plan: refine-ray eval --ttt (reward exact)")
    assert out[1] == ("  (a test-time-training config, eval.ttt.mode=refine: planned as `refine-ray eval --ttt "
                      "refine`, as --ttt would)")
    assert cli.main(args + ["--ttt"]) == 0
    assert capsys.readouterr().out.splitlines() == out[:1] + out[2:]
    assert out[-1].startswith("fits: fullest GPU")


def test_plan_command_prints_only_its_own_lines():
    """In a fresh process (DeepSpeed imported for the first time, on a machine without CUDA it announces
    "Setting accelerator to CPU" on stdout), stdout is the plan alone: its first line is the summary."""
    proc = subprocess.run([sys.executable, "-m", "refine_ray.cli", "plan", "--config",
                           str(ROOT / "configs" / "paper_mid_deltanet_1.3b.yaml"),
                           f"model.path={SHAPES / 'delta_net-1.3B-100B'}", "--gpu-memory", "80"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    assert out[0].startswith("memory plan: paper-mid-deltanet-1.3b: delta_net"), out[:2]
    assert out[-1].startswith("fits: fullest GPU") and not [line for line in out if line.startswith("[")]

"""Malformed inputs through the real entry points: one line on stderr, exit 2, nothing touched.

Every ``refine-ray train`` case runs ``refine_ray.cli.main`` in-process against a
pre-existing run directory (config, metrics, a complete checkpoint and its
``latest`` pointer) and checks that

  * the exit code is 2 and stderr is exactly one line ``refine-ray: ...`` naming
    the key or file and what was expected (no traceback);
  * every file of the run directory is byte-identical afterwards and nothing new
    appeared beside it;
  * Ray was never started (``refine_ray.preflight`` catches it in the driver process).

``eval`` and ``export`` cases check the same one-line rule and that no result file
or half-written export directory is left. Everything is real: the offline MiniLM
tokenizer, parquet/jsonl files written with pandas/pyarrow, models saved with
``save_pretrained``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from refine_ray.transport import checkpoint as ckpt
from refine_ray.cli import main
from refine_ray.config import load_config
from refine_ray.models import registry
from refine_ray.preflight import preflight

CONFIG = "configs/tiny_deltanet_mid.yaml"
# need = min_prefix + (n_chunks + 1) * response_length - 1 = 4 + 3 * 3 - 1 = 12 tokens
SMALL = ["refine.n_chunks=2", "refine.response_length=3", "refine.min_prefix=4", "data.max_length=64",
         "train.steps=1"]
LONG_TEXT = ("The committee reviewed the budget of the regional water authority and found that "
             "maintenance spending had fallen for three consecutive years while demand kept rising. ")


def _write_parquet(path: Path, **columns) -> str:
    pd.DataFrame(columns).to_parquet(path)
    return str(path)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ray_started() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out, captured.err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("refine-ray: "), err
    return err


@pytest.fixture(scope="module")
def vocab() -> int:
    from refine_ray.data import load_tokenizer

    return len(load_tokenizer())


@pytest.fixture()
def run(tmp_path):
    """A finished run's directory with a complete checkpoint, and a good corpus beside it."""
    out = tmp_path / "runs" / "r"
    tmp, step = ckpt.begin_save(out, 2)                    # committed as the trainer does: manifest, latest
    (tmp / "learner" / "ds").mkdir(parents=True)
    (tmp / "learner" / "ds" / "latest").write_text("ds")
    ckpt.commit_save(tmp, step, {"step": 2, "version": 2, "cursor": {"epoch": 0, "position": 4, "skipped": 0},
                                 "failures": 0, "pending": None, "pending_step": None, "config": {}})
    (out / "config.json").write_text(json.dumps({"name": "r"}))
    (out / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n')
    corpus = _write_parquet(tmp_path / "corpus.parquet", prompt=[LONG_TEXT * (i + 1) for i in range(4)])
    return tmp_path, out, corpus


def _train_case(name: str, tmp: Path, out: Path, corpus: str, vocab: int) -> tuple[list[str], list[str]]:
    """(extra argv before the overrides, overrides) that break exactly one thing of a good run."""
    argv: list[str] = []
    if name == "missing_text_column":
        return argv, [f"data.path={_write_parquet(tmp / 'c.parquet', body=[LONG_TEXT] * 3)}"]
    if name == "empty_documents":
        return argv, [f"data.path={_write_parquet(tmp / 'c.parquet', prompt=['', '', ''])}"]
    if name == "documents_too_short":
        return argv, [f"data.path={_write_parquet(tmp / 'c.parquet', prompt=['a short one', 'tiny', 'x y'])}"]
    if name == "non_text_values":
        return argv, [f"data.path={_write_parquet(tmp / 'c.parquet', prompt=[3, 1, 4])}"]
    if name == "null_text_value":
        return argv, [f"data.path={_write_parquet(tmp / 'c.parquet', prompt=[LONG_TEXT, None])}"]
    if name == "missing_answer_column":
        return argv, ["data.answer_column=answers"]
    if name == "bad_answer_values":
        path = _write_parquet(tmp / "c.parquet", prompt=[LONG_TEXT] * 3, answers=[["yes"], [], ["no"]])
        return argv, [f"data.path={path}", "data.answer_column=answers"]
    if name == "bad_config_type":
        return argv, ["refine.n_chunks=three"]
    if name == "bad_config_value":
        return argv, ["refine.top_p=1.5"]
    if name == "unknown_weight_sync_backend":
        return argv, ["system.weight_sync=nccl"]
    if name == "vllm_backend_without_vllm":
        return argv, ["rollout.backend=vllm", "refine.prefix_sharing=false"]
    if name == "unknown_config_key":
        return argv, ["refine.n_chunk=2"]
    if name == "max_length_below_need":
        return argv, ["data.max_length=8"]
    if name == "unknown_model_type":
        return argv, ["model.type=mamba2"]
    if name == "model_path_unknown_model_type":
        d = tmp / "mamba2"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "mamba2", "vocab_size": vocab}))
        return argv, [f"model.path={d}"]
    if name == "model_path_without_config_json":
        (tmp / "empty_model").mkdir()
        return argv, [f"model.path={tmp / 'empty_model'}"]
    if name == "model_path_without_weights":
        d = tmp / "no_weights"
        registry.build_model("delta_net", seed=0, vocab_size=vocab).config.save_pretrained(d)
        return argv, [f"model.path={d}"]
    if name == "tokenizer_model_vocab_mismatch":
        d = tmp / "small_vocab"
        registry.build_model("delta_net", seed=0, vocab_size=1000).save_pretrained(d)
        return argv, [f"model.path={d}"]
    if name == "missing_tokenizer":
        return argv, [f"tokenizer.path={tmp / 'no_tokenizer'}"]
    if name == "directory_where_file_expected":
        (tmp / "data" / "part-0.parquet").mkdir(parents=True)
        return argv, [f"data.path={tmp / 'data'}"]
    if name == "corrupt_parquet":
        (tmp / "c.parquet").write_bytes(b"PAR1 this is not really a parquet file")
        return argv, [f"data.path={tmp / 'c.parquet'}"]
    if name == "wrong_extension":
        (tmp / "c.csv").write_text("prompt\nhello world\n")
        return argv, [f"data.path={tmp / 'c.csv'}"]
    if name == "zero_row_parquet":
        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp / "c.parquet")
        return argv, [f"data.path={tmp / 'c.parquet'}"]
    if name == "zero_byte_jsonl":
        (tmp / "c.jsonl").write_bytes(b"")
        return argv, [f"data.path={tmp / 'c.jsonl'}", "data.text_column=text"]
    if name == "malformed_jsonl":
        (tmp / "c.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
        return argv, [f"data.path={tmp / 'c.jsonl'}", "data.text_column=text"]
    if name == "nonexistent_data_path":
        return argv, [f"data.path={tmp / 'nowhere.parquet'}"]
    if name == "malformed_yaml":
        (tmp / "bad.yaml").write_text("model:\n  type: delta_net\n refine: [unclosed\n")
        return ["--config", str(tmp / "bad.yaml")], []
    if name == "missing_config_file":
        return ["--config", str(tmp / "nope.yaml")], []
    if name == "latest_names_missing_step":
        (out / "checkpoints" / "latest").write_text("step_000009")
        return argv, []
    if name == "corrupt_trainer_state":
        (out / "checkpoints" / "step_000002" / "trainer.json").write_bytes(b"\x00garbage")
        return argv, []
    if name == "output_dir_is_a_file":
        (tmp / "runs" / "file").write_text("not a directory")
        return argv, [f"train.output_dir={tmp / 'runs' / 'file'}"]
    if name.startswith("answer_"):                          # post-training answers whose first one has no tokens
        answers = {"answer_empty_in_list": [["yes"], [""], ["no"]], "answer_whitespace": ["yes", "no", " \n\t "],
                   "answer_control_chars": [["yes", "x"], ["\x00\u200b", "fine"], ["no"]]}[name]
        path = _write_parquet(tmp / "c.parquet", prompt=[LONG_TEXT] * 3, answers=answers)
        return argv, [f"data.path={path}", "data.answer_column=answers"]
    if name == "empty_answer_in_second_shard":            # a glob: the message names the shard and its row
        (tmp / "shards").mkdir()
        _write_parquet(tmp / "shards" / "a.parquet", prompt=[LONG_TEXT] * 2, answers=[["yes"], ["no"]])
        _write_parquet(tmp / "shards" / "b.parquet", prompt=[LONG_TEXT] * 2, answers=[["fine"], [" "]])
        return argv, [f"data.path={tmp / 'shards'}/*.parquet", "data.answer_column=answers"]
    if name == "renamed_config_key":
        return argv, ["refine.sampling=entropy"]
    if name == "disabled_scorer":
        return argv, ["scorer.enabled=false"]
    if name == "defaults_cycle":
        (tmp / "a.yaml").write_text("defaults: [b.yaml]\n")
        (tmp / "b.yaml").write_text("defaults: [a.yaml]\n")
        return ["--config", str(tmp / "a.yaml")], []
    if name == "custom_resource_on_local_cluster":
        return argv, ["learner.resources.refine_learner=1"]
    if name == "num_cpus_below_layout":
        return argv, ["system.num_cpus=1"]
    if name == "num_gpus_below_layout":
        return argv, ["system.num_gpus=1"]
    if name == "weights_bin_pickles_code":
        return argv, [f"model.path={_payload_model(tmp / 'model', vocab, tmp / 'payload-ran')}"]
    if name.startswith("safetensors_") or name == "weights_shape_mismatch":
        d = tmp / "model"
        registry.build_model("delta_net", seed=0, vocab_size=vocab).save_pretrained(d)
        weights = d / "model.safetensors"
        if name == "safetensors_truncated":
            weights.write_bytes(weights.read_bytes()[:-1000])
        elif name == "safetensors_garbage":
            weights.write_bytes(b"\x01\x02not a safetensors file")
        elif name == "safetensors_foreign_tensors":       # a file of some other network's tensors
            from safetensors.torch import save_file

            save_file({"encoder.block.0.weight": torch.zeros(4, 4)}, str(weights))
        elif name == "safetensors_index_names_missing_shard":
            weights.rename(d / "model-00001-of-00002.safetensors")
            (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
                "model.embeddings.weight": "model-00001-of-00002.safetensors",
                "lm_head.weight": "model-00002-of-00002.safetensors"}}))
        else:                                               # config.json of a narrower model beside these weights
            registry.build_model("delta_net", seed=0, vocab_size=vocab, hidden_size=32).config.save_pretrained(d)
            return argv, [f"model.path={d}", "model.hidden_size=32"]   # the config agrees with config.json
        return argv, [f"model.path={d}"]
    if name in ("lr_nan", "lr_inf", "negative_max_retries", "negative_seed", "negative_min_length"):
        return argv, [{"lr_nan": "optim.lr=nan", "lr_inf": "optim.lr=.inf", "negative_max_retries": "train.max_retries=-1",
                       "negative_seed": "train.seed=-3", "negative_min_length": "data.min_length=-1"}[name]]
    if name == "output_dir_under_proc":
        return argv, ["train.output_dir=/proc/refine-ray-run"]
    if name == "output_dir_under_sys":
        return argv, ["train.output_dir=/sys/refine-ray-run"]
    if name == "output_dir_parent_is_a_file":
        (tmp / "runs" / "file").write_text("not a directory")
        return argv, [f"train.output_dir={tmp / 'runs' / 'file' / 'sub' / 'run'}"]
    if name == "glob_matches_nothing":
        return argv, [f"data.path={tmp / 'shards' / '*.parquet'}"]
    if name == "empty_data_path_list":
        return argv, ["data.path=[]"]
    if name == "data_path_list_of_numbers":
        return argv, ["data.path=[1, 2]"]
    if name == "val_path_missing":
        return argv, [f"train.val_path={tmp / 'held_out.parquet'}"]
    if name == "val_path_glob_matches_nothing":
        return argv, [f"train.val_path={tmp / 'held_out' / '*.jsonl'}"]
    if name == "val_path_missing_text_column":
        return argv, [f"train.val_path={_write_parquet(tmp / 'v.parquet', body=[LONG_TEXT])}"]
    raise AssertionError(name)


TRAIN_CASES = {
    "missing_text_column": ["data.text_column: 'prompt' not in", "columns: body"],
    "empty_documents": ["data.text_column: all 3 'prompt' values", "are empty"],
    "documents_too_short": ["no document has the 12 tokens needed", "refine.n_chunks=2",
                            "the longest of 3 has"],
    "non_text_values": ["data.text_column: row 0 of", "is int, expected text"],
    "null_text_value": ["data.text_column: row 1 of", "is NoneType, expected text"],
    "missing_answer_column": ["data.answer_column: 'answers' not in", "columns: prompt"],
    "bad_answer_values": ["data.answer_column: row 1 of 'answers'", "expected a string or a non-empty list"],
    "bad_config_type": ["config error: refine.n_chunks: expected an integer, got 'three'"],
    "bad_config_value": ["config error: refine.top_p: 1.5 is not in (0, 1]"],
    "vllm_backend_without_vllm": ["rollout.backend=vllm needs vLLM, which is not installed in this environment",
                                  "setup_vllm.sh"],
    "unknown_weight_sync_backend": ["system.weight_sync: 'nccl' is not a weight-sync backend; expected one of "
                                    "object_store, collective"],
    "unknown_config_key": ["config error: unknown config key 'refine.n_chunk'", "did you mean 'n_chunks'"],
    "max_length_below_need": ["data.max_length: 8 is below the 12 tokens"],
    "unknown_model_type": ["config error: model.type: 'mamba2' is not one of 'delta_net'"],
    "model_path_unknown_model_type": ["model.path:", "config.json' has model_type 'mamba2'; supported: delta_net"],
    "model_path_without_config_json": ["model.path:", "has no config.json"],
    "model_path_without_weights": ["model.path:", "has no weights (expected one of model.safetensors"],
    "tokenizer_model_vocab_mismatch": ["model.path:", "has vocab_size=1000 but the tokenizer",
                                       "tokenizer.path must match the model"],
    "missing_tokenizer": ["tokenizer.path:", "does not exist"],
    "directory_where_file_expected": ["data.path:", "part-0.parquet' is not a regular file"],
    "corrupt_parquet": ["data.path:", "c.parquet' is not a readable parquet file"],
    "wrong_extension": ["data.path:", "expected files of one type among .parquet", "got .csv"],
    "zero_row_parquet": ["data.path:", "has no rows"],
    "zero_byte_jsonl": ["data.path:", "has no rows (empty file)"],
    "malformed_jsonl": ["data.path: cannot read", "as json (JSON parse error"],
    "nonexistent_data_path": ["data.path:", "nowhere.parquet' does not exist"],
    "malformed_yaml": ["config error: config file", "not valid YAML"],
    "missing_config_file": ["config error: config file", "nope.yaml' does not exist"],
    "latest_names_missing_step": ["train.resume: checkpoint pointer", "names 'step_000009', which is not a "
                                  "checkpoint directory"],
    "corrupt_trainer_state": ["train.resume: checkpoint", "file 'trainer.json' has 8 bytes, the manifest says"],
    "output_dir_is_a_file": ["train.output_dir:", "exists and is not a directory"],
    "answer_empty_in_list": ["data.answer_column: row 1 of 'answers' in", "c.parquet", "is '', which tokenises to "
                             "no tokens"],
    "answer_whitespace": ["data.answer_column: row 2 of 'answers' in", "tokenises to no tokens"],
    "answer_control_chars": ["data.answer_column: row 1 of 'answers' in", "tokenises to no tokens"],
    "empty_answer_in_second_shard": ["data.answer_column: row 1 of 'answers' in", "shards/b.parquet' is ' ', "
                                     "which tokenises to no tokens"],
    "renamed_config_key": ["config error: config key 'refine.sampling': renamed to refine.cut_strategy"],
    "disabled_scorer": ["config error: config key 'scorer.enabled': removed: the scorer role always runs"],
    "defaults_cycle": ["config error: config file", "a.yaml': defaults include it again", "a.yaml -> ", "b.yaml -> "],
    "custom_resource_on_local_cluster": ["learner.resources: the layout needs 2 of custom resource 'refine_learner'",
                                         "but the local cluster (no system.ray_address) has 0"],
    "num_cpus_below_layout": ["system.num_cpus: the layout needs 2.5 CPUs (learner 2 x 0.5, scorer 1 x 0.5",
                              "but system.num_cpus=1"],
    "num_gpus_below_layout": ["system.num_gpus: the layout needs 2 GPUs", "but system.num_gpus=1"],
    "weights_bin_pickles_code": ["model.path:", "pytorch_model.bin' pickles 'io.open'", "could run code"],
    "safetensors_truncated": ["model.path:", "model.safetensors' is not a complete safetensors file",
                              "not fully covered"],
    "safetensors_garbage": ["model.path:", "model.safetensors' is not a complete safetensors file"],
    "safetensors_foreign_tensors": ["model.path:", "none of its tensors is a parameter of the delta_net model"],
    "safetensors_index_names_missing_shard": ["model.path:", "model.safetensors.index.json' names "
                                              "'model-00002-of-00002.safetensors', which does not exist"],
    "weights_shape_mismatch": ["model.path:", "model.safetensors': tensor 'lm_head.weight' has shape",
                               ", 64] but config.json builds", ", 32]"],
    "lr_nan": ["config error: optim.lr: nan is not a finite number"],
    "lr_inf": ["config error: optim.lr: inf is not a finite number"],
    "negative_max_retries": ["config error: train.max_retries: -1 must be >= 0"],
    "negative_seed": ["config error: train.seed: -3 must be >= 0"],
    "negative_min_length": ["config error: data.min_length: -1 must be >= 0"],
    "output_dir_under_proc": ["train.output_dir: '/proc/refine-ray-run' is not writable", "in '/proc'"],
    "output_dir_under_sys": ["train.output_dir: '/sys/refine-ray-run' is not writable", "in '/sys'"],
    "output_dir_parent_is_a_file": ["train.output_dir:", "sub/run' cannot be created:", "runs/file' is a file"],
    "glob_matches_nothing": ["data.path:", "shards/*.parquet' matches no files"],
    "empty_data_path_list": ["data.path: an empty list"],
    "data_path_list_of_numbers": ["config error: data.path: expected a string or a list of strings, got [1, 2]"],
    "val_path_missing": ["train.val_path:", "held_out.parquet' does not exist"],
    "val_path_glob_matches_nothing": ["train.val_path:", "held_out/*.jsonl' matches no files"],
    "val_path_missing_text_column": ["train.val_path: data.text_column: 'prompt' not in", "columns: body"],
}


def test_good_inputs_pass_preflight(run):
    """The base every case breaks one thing of is itself fine (so each case isolates its one fault)."""
    tmp, out, corpus = run
    cfg = load_config(CONFIG, [*SMALL, f"data.path={corpus}", f"train.output_dir={out}"])
    report = preflight(cfg)
    assert report.rows == report.usable == 4 and report.min_tokens == 12
    assert report.resume_from == out / "checkpoints" / "step_000002"
    assert not _ray_started()


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input_is_one_line_and_touches_nothing(case, run, vocab, capsys):
    tmp, out, corpus = run
    argv, overrides = _train_case(case, tmp, out, corpus, vocab)
    if not argv:
        argv = ["--config", CONFIG]
    runs_before = _snapshot(tmp / "runs")
    names_before = sorted(p.name for p in (tmp / "runs").iterdir())
    capsys.readouterr()                                     # set-up output (save_pretrained's progress bar)
    code = main(["train", *argv, *SMALL, f"data.path={corpus}", f"train.output_dir={out}", *overrides])
    err = _one_line_error(capsys)
    assert code == 2, err
    for needle in TRAIN_CASES[case]:
        assert needle in err, (needle, err)
    assert _snapshot(tmp / "runs") == runs_before          # config.json, metrics, checkpoint: byte-identical
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == names_before   # nothing created beside it
    assert not _ray_started()
    assert not Path("/proc/refine-ray-run").exists() and not Path("/sys/refine-ray-run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; the /proc and /sys "
                                              "cases cover 'not writable' under root")
def test_train_output_dir_without_write_permission(run, capsys):
    tmp, out, corpus = run
    locked = tmp / "locked"
    locked.mkdir(mode=0o555)
    code = main(["train", "--config", CONFIG, *SMALL, f"data.path={corpus}", f"train.output_dir={locked / 'r'}"])
    err = _one_line_error(capsys)
    assert code == 2 and "train.output_dir:" in err and "is not writable" in err, err
    assert not (locked / "r").exists() and not _ray_started()


def test_good_inputs_in_every_path_form_pass_preflight(run, tmp_path):
    """Globs, lists and save_to_disk directories reach the same corpus as the one parquet file."""
    import datasets

    tmp, out, corpus = run
    (tmp / "shards").mkdir()
    for i in range(2):
        _write_parquet(tmp / "shards" / f"part-{i}.parquet", prompt=[LONG_TEXT * (2 * i + j + 1) for j in range(2)])
    datasets.Dataset.from_dict({"prompt": [LONG_TEXT * (i + 1) for i in range(4)]}).save_to_disk(tmp / "saved")
    for path in (f"{tmp / 'shards'}/*.parquet", f"[{tmp / 'shards' / 'part-0.parquet'}, {tmp / 'shards'}/part-1*]",
                 str(tmp / "saved")):
        cfg = load_config(CONFIG, [*SMALL, f"data.path={path}", f"train.output_dir={out}",
                                   f"train.val_path={path}"])
        report = preflight(cfg)
        assert report.rows == report.usable == 4, path
        assert list(report.lengths) == list(preflight(load_config(CONFIG, [*SMALL, f"data.path={corpus}",
                                                                           f"train.output_dir={out}"])).lengths)


class _Payload:
    """Unpickling this creates a marker file: a harmless stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload_model(d, vocab, marker):
    """An HF model dir whose pytorch_model.bin also pickles a payload."""
    model = registry.build_model("delta_net", seed=0, vocab_size=vocab)
    model.config.save_pretrained(d)
    torch.save({**model.state_dict(), "payload": _Payload(marker)}, d / "pytorch_model.bin")
    return d


def test_pickle_payload_in_model_weights_never_runs(tmp_path, vocab, capsys):
    """eval and export refuse a pytorch_model.bin that pickles code (train: the case above)."""
    marker = tmp_path / "payload-ran"
    d = _payload_model(tmp_path / "model", vocab, marker)
    assert main(["eval", *EVAL, "--model", str(d), "--niah", "single:256:1", "--out", str(tmp_path / "r.json")]) == 2
    assert "refusing to load weights that pickle code" in _one_line_error(capsys)
    assert main(["export", "--from", str(d), "--out", str(tmp_path / "hf")]) == 2
    assert "refusing to load weights that pickle code" in _one_line_error(capsys)
    assert not marker.exists() and not (tmp_path / "hf").exists() and not (tmp_path / "r.json").exists()


EVAL = ["--model", "tiny:delta_net", "--no-progress", "--max-prompt-tokens", "64", "--max-gen-tokens", "2",
        "--config", "configs/ttt_tiny_longbench.yaml"]


@pytest.mark.parametrize("case, needles", [
    ("missing_answers_column", ["qasper_16384.parquet: missing column 'answers'",
                                "expected prompt, answers, max_gen_tokens, task"]),
    ("unknown_task", ["unknown LongBench task 'poetry'"]),
    ("answers_not_a_list", ["column 'answers' must be a list of strings"]),
    ("model_dir_without_config_json", ["--model", "not a local HF model directory (no config.json)"]),
    ("model_dir_unknown_model_type", ["--model", "unknown model_type 'mamba2'"]),
])
def test_eval_bad_input_is_one_line_and_writes_nothing(case, needles, tmp_path, capsys):
    rows = dict(prompt=["Question: what is two plus two?"], task=["qasper"], max_gen_tokens=[4])
    model = ["--model", "tiny:delta_net"]
    if case == "missing_answers_column":
        data = _write_parquet(tmp_path / "qasper_16384.parquet", **rows)
    elif case == "unknown_task":
        data = _write_parquet(tmp_path / "poetry_16384.parquet", **dict(rows, task=["poetry"], answers=[["4"]]))
    elif case == "answers_not_a_list":
        data = _write_parquet(tmp_path / "qasper_16384.parquet", **dict(rows, answers=["4"]))
    else:
        data = _write_parquet(tmp_path / "qasper_16384.parquet", **dict(rows, answers=[["4"]]))
        (tmp_path / "m").mkdir()
        if case == "model_dir_unknown_model_type":
            (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "mamba2", "vocab_size": 10}))
        model = ["--model", str(tmp_path / "m")]
    args = ["eval", *EVAL, *model, "--data", data, "--out", str(tmp_path / "res" / "r.json")]
    assert main(args) == 2
    err = _one_line_error(capsys)
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "res").exists()


def test_export_onto_existing_dir_without_overwrite(tmp_path, capsys):
    out = tmp_path / "exports" / "hf"
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"model_type": "delta_net"}')
    (out / "model.safetensors").write_bytes(b"previous export")
    before = _snapshot(tmp_path / "exports")
    assert main(["export", "--from", "tiny:delta_net", "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert f"--out '{out}' already exists (use --overwrite to replace it)" in err
    assert _snapshot(tmp_path / "exports") == before and [p.name for p in out.parent.iterdir()] == ["hf"]


@pytest.mark.parametrize("source, needle", [
    ("tiny:mamba2", "--from 'tiny:mamba2': unknown type (supported: delta_net"),
    ("{tmp}/weights.txt", "expected tiny:TYPE, an HF dir, a DeepSpeed checkpoint dir or a state-dict file"),
    ("{tmp}/missing", "no such file or directory"),
])
def test_export_bad_source_leaves_no_half_written_dir(source, needle, tmp_path, capsys):
    (tmp_path / "weights.txt").write_text("not weights")
    out = tmp_path / "exports" / "hf"
    assert main(["export", "--from", source.format(tmp=tmp_path), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert needle in err, err
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


def test_bad_cli_usage_is_exit_2(capsys):
    """argparse's own errors keep exit 2 (usage + one error line)."""
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", CONFIG, "--no-such-flag"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_real_process_stderr_is_one_line(run):
    """Outside pytest's capture too: library loggers/warnings writing to the real stderr add no lines."""
    tmp, out, corpus = run
    (tmp / "c.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')     # datasets logs this parse error itself
    before = _snapshot(tmp / "runs")
    proc = subprocess.run([sys.executable, "-m", "refine_ray.cli", "train", "--config", CONFIG, *SMALL,
                           f"data.path={tmp / 'c.jsonl'}", "data.text_column=text", f"train.output_dir={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "as json (JSON parse error" in proc.stderr
    assert _snapshot(tmp / "runs") == before


@pytest.mark.parametrize("case, needles", [
    ("out_is_a_directory", ["--out '", "r.json' is a directory (expected a file path)"]),
    ("out_parent_is_a_file", ["--out '", "cannot be created:", "res' is a file, not a directory"]),
    ("out_under_proc", ["--out '/proc/refine-ray-eval/r.json' is not writable", "in '/proc'"]),
    ("out_under_sys", ["--out '/sys/refine-ray-eval.json' is not writable", "in '/sys'"]),
])
def test_eval_unwritable_out_is_one_line_before_any_work(case, needles, tmp_path, capsys):
    data = _write_parquet(tmp_path / "qasper_16384.parquet", prompt=["Question: what is two plus two?"],
                          task=["qasper"], max_gen_tokens=[4], answers=[["4"]])
    out = {"out_is_a_directory": tmp_path / "res" / "r.json", "out_parent_is_a_file": tmp_path / "res" / "r.json",
           "out_under_proc": Path("/proc/refine-ray-eval/r.json"), "out_under_sys": Path("/sys/refine-ray-eval.json")}[case]
    if case == "out_is_a_directory":
        out.mkdir(parents=True)
    elif case == "out_parent_is_a_file":
        (tmp_path / "res").write_text("a file")
    before = _snapshot(tmp_path)
    assert main(["eval", *EVAL, "--data", data, "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    for needle in needles:
        assert needle in err, (needle, err)
    assert _snapshot(tmp_path) == before and not out.is_file()


@pytest.mark.parametrize("case, needles", [
    ("out_under_a_file", ["--out '", "hf' cannot be created:", "exports' is a file, not a directory"]),
    ("out_is_a_file", ["--out '", "hf' exists and is not a directory"]),
    ("out_under_proc", ["--out '/proc/refine-ray-export' is not writable", "in '/proc'"]),
    ("out_under_sys", ["--out '/sys/refine-ray-export/hf' is not writable", "in '/sys'"]),
])
def test_export_unwritable_out_is_one_line(case, needles, tmp_path, capsys):
    out = {"out_under_a_file": tmp_path / "exports" / "hf", "out_is_a_file": tmp_path / "hf",
           "out_under_proc": Path("/proc/refine-ray-export"), "out_under_sys": Path("/sys/refine-ray-export/hf")}[case]
    if case == "out_under_a_file":
        (tmp_path / "exports").write_text("a file")
    elif case == "out_is_a_file":
        out.write_text("a file")
    before, names = _snapshot(tmp_path), sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", "--from", "tiny:delta_net", "--out", str(out), "--overwrite"]) == 2
    err = _one_line_error(capsys)
    for needle in needles:
        assert needle in err, (needle, err)
    assert _snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == names

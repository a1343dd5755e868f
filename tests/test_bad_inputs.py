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
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

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
    step = out / "checkpoints" / "step_000002"
    (step / "learner" / "ds").mkdir(parents=True)
    (step / "learner" / "ds" / "latest").write_text("ds")
    torch.save({"step": 2, "version": 2, "cursor": {"epoch": 0, "position": 4, "skipped": 0}, "failures": 0,
                "pending": None, "pending_step": None, "config": {}}, step / "trainer.pt")
    (out / "checkpoints" / "latest").write_text("step_000002")
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
        (out / "checkpoints" / "step_000002" / "trainer.pt").write_bytes(b"\x00garbage")
        return argv, []
    if name == "output_dir_is_a_file":
        (tmp / "runs" / "file").write_text("not a directory")
        return argv, [f"train.output_dir={tmp / 'runs' / 'file'}"]
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
    "corrupt_trainer_state": ["train.resume: checkpoint", "trainer.pt is unreadable"],
    "output_dir_is_a_file": ["train.output_dir:", "exists and is not a directory"],
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
    capsys.readouterr()                                     # set-up output (save_pretrained's progress bar)
    code = main(["train", *argv, *SMALL, f"data.path={corpus}", f"train.output_dir={out}", *overrides])
    err = _one_line_error(capsys)
    assert code == 2, err
    for needle in TRAIN_CASES[case]:
        assert needle in err, (needle, err)
    assert _snapshot(tmp / "runs") == runs_before          # config.json, metrics, checkpoint: byte-identical
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == sorted(
        ["r", "file"] if case == "output_dir_is_a_file" else ["r"])
    assert not _ray_started()


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
        main(["train", "--no-such-flag"])
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

"""`refine-ray eval` on real LongBench / RULER rows with a tiny model; bad inputs are one-line errors."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refine_ray.cli import main
from refine_ray.eval.tables import load_result, render
from refine_ray.data import truncate
from refine_ray.evaluate import EvalConfig, EvalSet, gen_budget

TINY = ["--config", "configs/ttt_tiny_longbench.yaml", "--model", "tiny:delta_net", "--no-progress",
        "--max-prompt-tokens", "96", "--max-gen-tokens", "3", "eval.ruler_gen_tokens=3",
        "refine.n_chunks=2", "refine.response_length=3", "refine.min_prefix=8"]


def test_eval_longbench_and_ruler_with_ttt_writes_a_table_json(shared_data, tmp_path, capsys):
    out = tmp_path / "res" / "run.json"
    rc = main(["eval", *TINY, "--data", str(shared_data / "longbench" / "trec_16384.parquet"),
               "--data", str(shared_data / "ruler" / "ruler_squadqa_delta_net_4096_200_test.parquet"),
               "--limit", "2", "--ttt", "refine", "--name", "tiny-ttt", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiny-ttt: trec=") and "ttt refine x1 reset" in lines[0]
    obj = json.loads(out.read_text())
    assert obj["run_name"] == "tiny-ttt"
    assert 0 <= obj["trec"] <= 100 and 0 <= obj["ruler_squadqa_4096"] <= 100
    meta = obj["meta"]
    assert meta["sets"]["trec"] == {"rows": 2, "source": str(shared_data / "longbench" / "trec_16384.parquet"),
                                    "truncated_prompts": 2}
    assert meta["ttt_metrics"]["ttt/batches"] == 4 and meta["ttt_metrics"]["ttt/ntp_fallback_prompts"] == 0
    preds = [json.loads(line) for line in out.with_name("run.predictions.jsonl").read_text().splitlines()]
    assert [(p["set"], p["row"]) for p in preds] == [("trec", 0), ("trec", 1), ("ruler_squadqa_4096", 0),
                                                      ("ruler_squadqa_4096", 1)]
    result = load_result(out)
    assert result.scores.keys() == {"trec", "ruler_squadqa_4096"}
    table = render([result])
    assert "| tiny-ttt |" in table and "squadqa 4K" in table


def test_eval_niah_without_ttt(tokenizer, tmp_path, capsys):
    out = tmp_path / "niah.json"
    assert main(["eval", *TINY, "--niah", "multikey:256:2", "--out", str(out)]) == 0
    obj = json.loads(out.read_text())
    assert obj["run_name"] == "tiny_delta_net-none" and "niah_multikey_256" in obj
    assert load_result(out).ruler() == {("niah_multikey", 256): obj["niah_multikey_256"]}


def test_truncate_middle_and_generation_budgets():
    ids = list(range(10))
    assert truncate(ids, 20, "middle") == ids          # LongBench's rule: first max//2, last the rest
    assert truncate(ids, 5, "middle") == [0, 1, 7, 8, 9]
    lb = EvalSet("qmsum", "longbench", [], "x")
    assert gen_budget(lb, {"max_gen_tokens": 512}, EvalConfig()) == 512          # per-task length
    assert gen_budget(lb, {"max_gen_tokens": 512}, EvalConfig(max_gen_tokens=32)) == 32
    assert gen_budget(EvalSet("ruler_squadqa_4096", "ruler", [], "x"), {}, EvalConfig()) == 32


def _parquet(path, **cols):
    pq.write_table(pa.table(cols), path)
    return str(path)


@pytest.mark.parametrize("case,needle", [
    ("missing_column", "missing column 'answers'"),
    ("unknown_task", "unknown LongBench task 'poetry'"),
    ("bad_niah", "expected VARIANT:LENGTH:N"),
    ("bad_override", "unknown config key 'eval.ttt.stepz'"),
    ("no_file", "no such file"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, case, needle):
    args = ["eval", *TINY, "--out", str(tmp_path / "r.json")]
    if case == "missing_column":
        args += ["--data", _parquet(tmp_path / "qasper_16384.parquet", prompt=["p"], task=["qasper"],
                                    max_gen_tokens=[8])]
    elif case == "unknown_task":
        args += ["--data", _parquet(tmp_path / "poetry_16384.parquet", prompt=["p"], answers=[["a"]],
                                    task=["poetry"], max_gen_tokens=[8])]
    elif case == "bad_niah":
        args += ["--niah", "multikey:4k"]
    elif case == "bad_override":
        args += ["--niah", "single:128:1", "eval.ttt.stepz=2"]
    else:
        args += ["--data", str(tmp_path / "missing_16384.parquet")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "r.json").exists()

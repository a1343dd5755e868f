"""`refine-ray eval` on real LongBench / RULER rows with a tiny model; bad inputs are one-line errors."""
import json

import torch

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refine_ray.cli import main
from refine_ray.eval.tables import load_result, render
from refine_ray.data import truncate
from refine_ray.eval.evaluate import EvalConfig, EvalSet, build_eval_model, gen_budget, score_set, stop_ids
from refine_ray.eval.metrics import normalize_answer
from refine_ray.eval.summary import default_run_name
from refine_ray.eval.ttt import TestTimeTrainer

TINY = ["--config", "configs/ttt_tiny_longbench.yaml", "--model", "tiny:delta_net", "--no-progress",
        "--max-prompt-tokens", "96", "--max-gen-tokens", "3", "eval.ruler_gen_tokens=3", "eval.niah_gen_tokens=3",
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
    assert 0 <= obj["ruler_squadqa_string_match_part_4096"] <= 100   # RULER's own metric beside the paper's
    meta = obj["meta"]
    assert {k: meta["sets"]["trec"][k] for k in ("rows", "source", "truncated_prompts")} == {
        "rows": 2, "source": str(shared_data / "longbench" / "trec_16384.parquet"), "truncated_prompts": 2}
    assert meta["ttt_metrics"]["ttt/batches"] == 4 and meta["ttt_metrics"]["ttt/ntp_fallback_prompts"] == 0
    preds = [json.loads(line) for line in out.with_name("run.predictions.jsonl").read_text().splitlines()]
    assert [(p["set"], p["row"]) for p in preds] == [("trec", 0), ("trec", 1), ("ruler_squadqa_4096", 0),
                                                      ("ruler_squadqa_4096", 1)]
    result = load_result(out)
    assert result.scores.keys() == {"trec", "ruler_squadqa_4096", "ruler_squadqa_string_match_part_4096"}
    table = render([result])
    assert "| tiny-ttt |" in table and "squadqa 4K" in table and "squadqa_string_match_part 4K" in table
    assert "first-line rule" in table


def test_eval_niah_without_ttt(tokenizer, tmp_path, capsys):
    """RULER NIAH tasks by name; the summary reports NIAH apart from the other families; an old variant
    name is one line naming the RULER task, before anything is generated or answered."""
    out = tmp_path / "niah.json"
    assert main(["eval", *TINY, "--niah", "niah_single_1:512:2", "--niah", "niah_multikey_3:1024:2",
                 "--out", str(out)]) == 0
    obj = json.loads(out.read_text())
    assert obj["run_name"] == "tiny_delta_net-ttt_none"
    assert load_result(out).ruler() == {("niah_single_1", 512): obj["niah_single_1_512"],
                                        ("niah_multikey_3", 1024): obj["niah_multikey_3_1024"]}
    assert obj["meta"]["scorers"]["niah_multikey_3_1024"] == {"family": "niah", "metric": "string_match_all"}
    line = capsys.readouterr().out.strip()
    assert f"| means: niah/string_match_all={(obj['niah_single_1_512'] + obj['niah_multikey_3_1024']) / 2:.2f} " \
           f"(2 sets) | 4 rows; ttt none;" in line
    assert main(["eval", *TINY, "--niah", "multikey:4096:20", "--out", str(tmp_path / "old.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'multikey' is now niah_multikey_1" in err, err


def test_summary_reports_each_family_apart(shared_data, tmp_path, capsys):
    """LongBench, RULER QA (both metrics) and NIAH means are separate; nothing averages across families."""
    out = tmp_path / "mix.json"
    assert main(["eval", *TINY, "--data", str(shared_data / "longbench" / "qasper_16384.parquet"), "--data",
                 str(shared_data / "ruler" / "ruler_squadqa_delta_net_4096_200_test.parquet"),
                 "--niah", "niah_single_1:512:1", "--limit", "1", "--out", str(out)]) == 0
    obj = json.loads(out.read_text())
    line = capsys.readouterr().out.strip()
    means = line.split(" | ")[1]
    assert means == (f"means: longbench[thudm]={obj['qasper']:.2f} (1 task), "
                     f"ruler_qa/first_line={obj['ruler_squadqa_4096']:.2f} (1 set), "
                     f"ruler_qa/string_match_part={obj['ruler_squadqa_string_match_part_4096']:.2f} (1 set), "
                     f"niah/string_match_all={obj['niah_single_1_512']:.2f} (1 set)")
    assert "avg" not in line


@pytest.mark.parametrize("model, name", [
    ("tiny:lact", "tiny_lact-ttt_ntp"), ("outputs/my-run/export", "my-run-ttt_ntp"),
    ("outputs/my-run/hf/", "my-run-ttt_ntp"), ("runs/exp3/checkpoints/step_40/hf", "exp3-ttt_ntp"),
    ("models/deltanet-1.3b", "deltanet-1.3b-ttt_ntp")])
def test_default_run_name_is_the_model_dirs_meaningful_name(model, name):
    assert default_run_name(model, "ntp") == name


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
    ("bad_niah", "expected TASK:LENGTH:N"),
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
        args += ["--niah", "niah_multikey_1:4k"]
    elif case == "bad_override":
        args += ["--niah", "niah_single_1:128:1", "eval.ttt.stepz=2"]
    else:
        args += ["--data", str(tmp_path / "missing_16384.parquet")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "r.json").exists()


def test_longbench_e_file_reports_length_buckets_beside_the_overall_score(tmp_path, capsys):
    """A LongBench-E file (task qasper_e, a `length` column) gets scorer_e's 0-4k / 4-8k / 8k+ scores."""
    prompts = [f"Passage {i}: the {w} sat on the mat. Question: who sat? Answer:"
               for i, w in enumerate(["cat", "dog", "owl", "fox", "eel"])]
    lengths = [120, 3999, 4000, 9000, 15000]       # buckets 0-4k, 0-4k, 4-8k, 8k+, 8k+ (upstream: < 4000, < 8000)

    def run(answers, name):
        data = _parquet(tmp_path / f"{name}.parquet", prompt=prompts, answers=answers, task=["qasper_e"] * 5,
                        max_gen_tokens=[3] * 5, length=lengths)
        out = tmp_path / f"{name}.json"
        assert main(["eval", *TINY, "--data", data, "--name", name, "--out", str(out)]) == 0
        return out

    # the greedy answers of the (deterministic) tiny model, then golds chosen so each row is a known hit or miss
    preds = [p["prediction"] for p in _preds(run([["x"]] * 5, "probe"))]
    assert all(normalize_answer(p) for p in preds), preds     # each has a token, so F1(p, p) = 1
    hit = [True, False, True, True, False]
    # "the" normalises to no tokens (articles are dropped): F1 = 0 whatever the prediction
    out = run([[p] if h else ["the"] for p, h in zip(preds, hit)], "lbe")
    obj = json.loads(out.read_text())
    # 0-4k: rows 0 (hit), 1 (miss) -> 50; 4-8k: row 2 (hit) -> 100; 8k+: rows 3 (hit), 4 (miss) -> 50; all: 3/5
    assert obj["qasper_e"] == 60.0
    assert obj["qasper_e_by_length"] == {"0-4k": 50.0, "4-8k": 100.0, "8k+": 50.0}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "lbe: qasper_e=60.00 | means: longbench[thudm]=60.00 (1 task) | 5 rows;")
    result = load_result(out)
    assert result.by_length == {"qasper_e": {"0-4k": 50.0, "4-8k": 100.0, "8k+": 50.0}}
    table = render([result])
    assert "| Run | qasper_e 0-4k | qasper_e 4-8k | qasper_e 8k+ | qasper_e all |" in table
    assert "| lbe | 50.0 | 100.0 | 50.0 | 60.0 |" in table
    # without a length column (or for a LongBench task) there are no buckets
    rows = [{"answers": ["a cat"], "prompt": "p"}]
    assert score_set(EvalSet("qasper_e", "longbench", rows, "x"), ["a cat"]) == {"qasper_e": 100.0}
    assert score_set(EvalSet("qasper", "longbench", [{**rows[0], "length": 10}], "x"), ["cat"]) == {"qasper": 100.0}


def test_whitespace_prompt_is_one_line_error_before_any_work(tmp_path, capsys):
    data = _parquet(tmp_path / "qasper_16384.parquet", prompt=["What is a cat?", " \n\t "],
                    answers=[["a pet"], ["x"]], task=["qasper", "qasper"], max_gen_tokens=[3, 3])
    out = tmp_path / "r.json"
    assert main(["eval", *TINY, "--data", data, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "qasper row 1 prompt tokenises to no tokens" in err, err
    assert list(tmp_path.iterdir()) == [tmp_path / "qasper_16384.parquet"]   # nothing answered or written


def _preds(out):
    return [json.loads(line) for line in out.with_name(out.stem + ".predictions.jsonl").read_text().splitlines()]


def test_failing_row_keeps_answered_rows_and_rerun_resumes(shared_data, tmp_path, capsys, monkeypatch):
    data = str(shared_data / "longbench" / "qasper_16384.parquet")
    args = ["eval", *TINY, "--data", data, "--limit", "4"]
    fresh = tmp_path / "fresh.json"
    assert main([*args, "--out", str(fresh)]) == 0
    real, calls = TestTimeTrainer.answer, []

    def fail_on_third(self, *a, **k):   # the third row's generation fails
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("row failed")
        return real(self, *a, **k)

    monkeypatch.setattr(TestTimeTrainer, "answer", fail_on_third)
    out = tmp_path / "run.json"
    with pytest.raises(RuntimeError, match="row failed"):
        main([*args, "--out", str(out)])
    assert [p["row"] for p in _preds(out)] == [0, 1] and not out.exists()   # answered rows kept
    calls.clear()
    monkeypatch.setattr(TestTimeTrainer, "answer", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    assert main([*args, "--out", str(out)]) == 0
    assert len(calls) == 2                                   # only rows 2 and 3 answered again
    obj = json.loads(out.read_text())
    assert obj["meta"]["resumed_rows"] == 2 and obj["qasper"] == json.loads(fresh.read_text())["qasper"]
    assert _preds(out) == _preds(fresh)                      # same rows, predictions, scores
    capsys.readouterr()
    # other settings: a one-line refusal, nothing touched
    before = out.with_name("run.predictions.jsonl").read_text()
    assert main([*args, "--out", str(out), "--max-gen-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to resume: eval.max_gen_tokens was 3, now 2" in err, err
    assert out.with_name("run.predictions.jsonl").read_text() == before


def _newline_tokenizer(tmp_path):
    """A real byte-level BPE tokenizer (has a newline token, unlike the WordPiece default)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Dialogue: hi\nSummary: they talk.\n"] * 20, vocab_size=300,
                            special_tokens=["<eos>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
    tok.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


def test_samsum_stops_at_newline_after_one_token(tmp_path):
    from refine_ray.config import load_config
    from refine_ray.models.generation import generate

    cfg = load_config("configs/ttt_tiny_longbench.yaml", [])
    model, tok = build_eval_model("tiny:delta_net", cfg, _newline_tokenizer(tmp_path))
    nl = tok.encode("\n", add_special_tokens=False)[-1]
    eos = sorted({tok.eos_token_id, model.config.eos_token_id})   # the tokenizer's and the model's
    assert stop_ids(EvalSet("samsum", "longbench", [], "x"), model, tok) == (sorted({*eos, nl}), 1)
    assert stop_ids(EvalSet("samsum_e", "longbench", [], "x"), model, tok) == (sorted({*eos, nl}), 1)
    assert stop_ids(EvalSet("trec", "longbench", [], "x"), model, tok) == (eos, 0)
    # generation: with the greedy first token as a stop id, min_new_tokens=1 still answers (HF min_length)
    model.eval()
    prompt = torch.tensor(tok.encode("Dialogue: hi", add_special_tokens=False))
    first = int(generate(model, prompt, 1)[0])
    assert generate(model, prompt, 4, eos_token_id=[first]).numel() == 0
    out = generate(model, prompt, 4, eos_token_id=[first], min_new_tokens=1)
    assert out.numel() >= 1 and int(out[0]) != first

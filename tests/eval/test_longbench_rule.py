"""eval.longbench_rule: THUDM's LongBench scorer vs the REFINE reference's (verl/utils/reward_score/
longbench.py), on cases where they differ and where they do not; every value derived by hand from
the two rules (the reference: QA tasks keep the raw first line; QA F1 / ROUGE / classification
strip first; code_sim falls back to the whole answer)."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from refine_ray.cli import main
from refine_ray.eval.metrics import REFINE_TASKS, score_example, score_longbench, task_classes
from refine_ray.eval.tables import load_result, render


def both(task, pred, golds, classes=None):
    return (score_example(task, pred, golds, classes, rule="thudm"),
            score_example(task, pred, golds, classes, rule="refine"))


def test_qa_raw_first_line():
    # narrativeqa "\nTwo": THUDM normalises the whole answer -> "two" = gold, F1 1; the reference keeps
    # "\nTwo".split("\n")[0] = "" -> no tokens, F1 0
    assert both("narrativeqa", "\nTwo", ["Two"]) == (1.0, 0.0)
    # hotpotqa "Paris\nIt is in France": THUDM: 5 tokens "paris it is in france" vs "paris": P 1/5, R 1,
    # F1 = 2 * 0.2 / 1.2 = 1/3; the reference: first line "Paris" -> 1.0
    thudm, refine = both("hotpotqa", "Paris\nIt is in France", ["Paris"])
    assert thudm == pytest.approx(1 / 3) and refine == 1.0
    # the strip changes no QA F1: normalisation squeezes whitespace anyway
    assert both("qasper", "  Paris  ", ["Paris"]) == (1.0, 1.0)
    # trec / triviaqa / samsum: both cut lstrip('\n').split('\n')[0]
    assert both("triviaqa", "\n\nParis\nLyon", ["Paris"]) == (1.0, 1.0)


def test_code_sim_whole_answer_when_no_line_qualifies():
    # "`x = 1`": its only line has a backtick. THUDM compares '' -> 0. The reference compares the whole
    # answer: indel("`x = 1`", "x = 1") = 2, ratio (7 + 5 - 2) / 12 = 0.8333 -> round(83.33) = 83 -> 0.83
    assert both("lcc", "`x = 1`", ["x = 1"]) == (0.0, 0.83)
    # every line a comment: whole "\n# comment\n// more" (18 chars) vs "# comment" (9): LCS 9, indel 9,
    # ratio (27 - 9) / 27 = 0.667 -> 67; THUDM: '' -> 0
    assert both("repobench-p", "\n# comment\n// more", ["# comment"]) == (0.0, 0.67)
    # a qualifying line: both take it (after leading newlines), no strip in either
    assert both("lcc", "\n\n# c\n  x = 1", ["  x = 1"]) == (1.0, 1.0)


def test_rouge_after_strip():
    # gov_report "The cat sat.\n": the rouge package splits on '.': ["The cat sat", "\n"] -> the second piece
    # is the sentence "" whose word "" counts: n = 4 distinct words, overlap 3, P 3/4, R 1,
    # F = 2 * 0.75 / (1.75 + 1e-8); the reference strips first: "The cat sat." -> n = 3, F = 2 / (2 + 1e-8)
    thudm, refine = both("gov_report", "The cat sat.\n", ["The cat sat."])
    assert thudm == 1.5 / (1.75 + 1e-8) and refine == 2 / (2 + 1e-8)
    # samsum: both cut the first line "the cat. " first; THUDM then counts "" (P 2/3: F 0.8), the reference not
    thudm, refine = both("samsum", "the cat. \nsecond line", ["the cat"])
    assert thudm == pytest.approx(0.8, abs=1e-8) and refine == pytest.approx(1.0, abs=1e-8)


def test_classification_agrees(shared_data):
    """The strip cannot change a class match (no class name has edge whitespace), and on the REFINE
    release's trec file the derived classes are the reference's hard-coded 50, none inside another
    (so their order, which LongBench's removal loop depends on, cannot matter): equal numbers."""
    rows = pq.read_table(shared_data / "longbench" / "trec_16384.parquet").to_pylist()
    classes = task_classes("trec", rows)
    assert len(classes) == 50 and "Lasting time of somethin" in classes   # LongBench's own typo, as the reference
    assert not [(a, b) for a in classes for b in classes if a != b and a in b]
    # "Food or Animal" matches Food and Animal -> 1/2 in both; " City " -> City -> 1
    assert both("trec", "Food or Animal\nCity", ["Food"], classes) == (0.5, 0.5)
    assert both("trec", "\n City \n", ["City"], classes) == (1.0, 1.0)
    preds = [f"{c}\n" for c in classes[:10]]
    golds = [[c] for c in classes[:10]]
    assert score_longbench("trec", preds, golds, classes, "thudm") == score_longbench("trec", preds, golds,
                                                                                      classes, "refine") == 100.0


def test_refine_rule_scores_only_the_reference_tasks():
    assert len(REFINE_TASKS) == 14 and "lsht" not in REFINE_TASKS and "musique" in REFINE_TASKS
    for task in ("lsht", "passage_count", "multifieldqa_zh"):
        with pytest.raises(ValueError, match=f"longbench_rule=refine: upstream ReFINE's scorer has no rule "
                                             f"for '{task}'"):
            score_example(task, "x", ["x"], ["x"], rule="refine")
    assert score_example("qasper_e", "\nTwo", ["Two"], rule="refine") == 0.0   # LongBench-E: its task's rule
    with pytest.raises(ValueError, match="unknown LongBench rule 'paper'"):
        score_example("qasper", "x", ["x"], rule="paper")


def test_eval_reports_the_rule_in_result_and_table(tmp_path, capsys):
    """A run under each rule: the JSON says which rule produced each LongBench number, the summary line and
    the table show it; a task the rule cannot score is refused before any row is answered."""
    data = tmp_path / "narrativeqa_16384.parquet"
    import pyarrow as pa

    pq.write_table(pa.table({"prompt": ["Story: two cats. Question: how many cats? Answer:"] * 2,
                             "answers": [["x"], ["y"]], "task": ["narrativeqa"] * 2, "max_gen_tokens": [4, 4]}), data)
    base = ["eval", "--config", "configs/ttt_tiny_longbench.yaml", "--model", "tiny:delta_net", "--no-progress",
            "--data", str(data)]
    outs = {}
    for rule in ("thudm", "refine"):
        outs[rule] = tmp_path / f"{rule}.json"
        assert main([*base, "--out", str(outs[rule]), f"eval.longbench_rule={rule}"]) == 0
        obj = json.loads(outs[rule].read_text())
        assert obj["meta"]["longbench_rule"] == rule
        assert obj["meta"]["scorers"]["narrativeqa"] == {"family": "longbench", "metric": "qa_f1", "rule": rule}
        assert f"longbench[{rule}]=" in capsys.readouterr().out
    table = render([load_result(outs["thudm"]), load_result(outs["refine"])])
    assert "| Run | Rule | NQ |" in table
    assert "| tiny_delta_net-ttt_none | thudm |" in table and "| tiny_delta_net-ttt_none | refine |" in table
    assert "compare rows with the same Rule only" in table
    # lsht under the reference's rule: refused before any row is answered
    lsht = tmp_path / "lsht.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "answers": [["a"]], "task": ["lsht"], "max_gen_tokens": [2]}), lsht)
    out = tmp_path / "lsht.json"
    assert main([*base[:-1], str(lsht), "--out", str(out), "eval.longbench_rule=refine"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no rule for 'lsht'" in err and not out.exists()

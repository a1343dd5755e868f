"""LongBench / RULER-QA metrics on hand-worked examples."""
from __future__ import annotations

import pytest

from refine_ray.eval.metrics import (
    FIRST_LINE_TASKS, LONGBENCH_E_TASKS, LONGBENCH_TASKS, PAPER_TASKS, TASK_METRIC, base_task,
    classification_score, code_sim, count_score, first_line, normalize_answer, qa_f1, qa_f1_zh,
    rouge_l, rouge_zh, ruler_qa_hit, score_example, score_longbench, score_longbench_e,
    score_ruler_qa, task_classes,
)
from refine_ray.eval.rouge import lcs_tokens, split_sentences


# ---------------------------------------------------------------- QA F1
def test_normalize_answer() -> None:
    # lower -> drop punctuation -> drop whole-word articles -> squeeze spaces
    assert normalize_answer("The  U.S.A., an ANOTHER theme!") == "usa another theme"
    assert normalize_answer("a an the") == ""


def test_qa_f1_partial_overlap() -> None:
    # pred "cat sat on mat" (4 tokens), gold "cat on mat" (3); common 3
    # P = 3/4, R = 3/3, F1 = 2*0.75*1/1.75 = 6/7
    assert qa_f1("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)


def test_qa_f1_punctuation_and_duplicates() -> None:
    assert qa_f1("U.S.A.", "usa") == 1.0
    # pred "dog dog dog", gold "dog": common = min(3,1) = 1; P = 1/3, R = 1
    # F1 = 2*(1/3)*1 / (4/3) = 0.5
    assert qa_f1("the dog, dog... DOG", "dog") == pytest.approx(0.5)


def test_qa_f1_empty() -> None:
    assert qa_f1("", "Paris") == 0.0
    assert qa_f1("Paris", "The") == 0.0  # gold normalises to no tokens


def test_qa_max_over_golds_and_task_average() -> None:
    # "Paris, France" vs "London": 0; vs "Paris": P = 1/2, R = 1 -> F1 = 2/3
    assert score_example("hotpotqa", "Paris, France", ["London", "Paris"]) == pytest.approx(2 / 3)
    # (2/3 + 0 + 1) / 3 * 100 = 55.555... -> 55.56
    got = score_longbench("hotpotqa", ["Paris, France", "", "london"],
                          [["London", "Paris"], ["x"], ["London"]])
    assert got == 55.56


def test_first_line_only_for_longbench_tasks() -> None:
    assert first_line("\n\nParis\nFrance is nice") == "Paris"
    assert FIRST_LINE_TASKS == {"trec", "triviaqa", "samsum", "lsht"}
    # triviaqa cuts to "Paris" -> 1.0
    assert score_example("triviaqa", "\nParis\nFrance is nice", ["Paris"]) == 1.0
    # hotpotqa keeps all 4 tokens: P = 1/4, R = 1, F1 = 0.5/1.25 = 0.4
    assert score_example("hotpotqa", "\nParis\nFrance is nice", ["Paris"]) == pytest.approx(0.4)


# ---------------------------------------------------------------- ROUGE-L (rouge package rules)
def test_rouge_single_sentence() -> None:
    # LCS "the cat on the mat" -> distinct LCS words {the, cat, on, mat} = 4
    # n = |{the,cat,sat,on,mat}| = 5, m = |{the,cat,is,on,mat}| = 5; P = R = 0.8 -> F = 0.8
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-7)


def test_rouge_summary_level_union() -> None:
    # sentences: hyp ["a b", "c d"], ref ["a c", "b d"]
    # ref "a c": LCS with "a b" = {a}, with "c d" = {c}; ref "b d": {b}, {d}
    # union {a,b,c,d} = 4, n = m = 4 -> F = 1 (a flat LCS would give 3/4)
    assert split_sentences("a b. c d") == ["a b", "c d"]
    assert rouge_l("a b. c d", "a c. b d") == pytest.approx(1.0, abs=1e-7)


def test_rouge_case_and_trailing_period_quirks() -> None:
    # case kept: LCS {world}; P = R = 1/2 -> F = 0.5
    assert rouge_l("Hello world", "hello world") == pytest.approx(0.5, abs=1e-7)
    # "x y. " -> sentences ["x y", ""] -> words {x, y, ""}: n = 3, m = 2, overlap 2
    # P = 2/3, R = 1 -> F = 2*(2/3)/(5/3) = 0.8
    assert rouge_l("x y. ", "x y") == pytest.approx(0.8, abs=1e-7)


def test_rouge_empty() -> None:
    assert rouge_l("", "a summary") == 0.0
    assert rouge_l("...", "a summary") == 0.0  # no non-empty sentence
    assert rouge_l("a summary", "") == 0.0


def test_lcs_tie_break() -> None:
    # on a tie the package drops the hypothesis' last token first (moves left):
    # ref [a,b] vs hyp [b,a]: (2,2) no match, tie 1 vs 1 -> (2,1): b == b
    assert lcs_tokens(["a", "b"], ["b", "a"]) == ["b"]
    assert lcs_tokens(["x", "a", "y"], ["a", "x", "y"]) == ["a", "y"]


def test_samsum_uses_first_line_and_rouge() -> None:
    # first line "the cat sat on the mat" -> 0.8 as above; * 100, rounded
    got = score_longbench("samsum", ["the cat sat on the mat\nmore text here"],
                          [["the cat is on the mat"]])
    assert got == 80.0


# ---------------------------------------------------------------- trec
CLASSES = ["loc", "location", "Other location", "City", "Country"]


def test_classification_basic() -> None:
    # matches [City, Country], gold City among them -> 1/2
    assert classification_score("City or Country", "City", all_classes=CLASSES) == 0.5
    assert classification_score("Country", "City", all_classes=CLASSES) == 0.0
    assert classification_score("city", "City", all_classes=CLASSES) == 0.0  # case-sensitive
    assert classification_score("", "City", all_classes=CLASSES) == 0.0


def test_classification_substring_rule() -> None:
    # classes in pred: [location, Other location]; "location" is a proper substring
    # of the gold -> dropped -> [Other location] -> 1/1
    assert classification_score("Other location", "Other location",
                                all_classes=["Other location", "location"]) == 1.0
    # LongBench removes while iterating: matches [loc, location, Other location];
    # "loc" removed, the list shifts and "location" is skipped, so
    # [location, Other location] remain -> 1/2
    assert classification_score("Other location", "Other location", all_classes=CLASSES) == 0.5


def test_trec_first_line_and_required_classes() -> None:
    # first line "City" -> matches [City] -> 1.0 -> 100.0
    assert score_longbench("trec", ["City\nCountry"], [["City"]], CLASSES) == 100.0
    with pytest.raises(ValueError, match="all_classes"):
        score_longbench("trec", ["City"], [["City"]])


# ---------------------------------------------------------------- code
def test_code_sim_first_code_line() -> None:
    # ``` and # lines skipped -> "x = 1" == gold -> 1.0
    assert code_sim("```python\n# comment\nx = 1\ny = 2", "x = 1") == 1.0
    assert code_sim("int x; // set\nint y;", "int y;") == 1.0
    # "return a + b" (12 chars) vs "return a+b" (10): indel distance 2,
    # ratio = (22 - 2) / 22 = 90.909 -> rounded 91 -> 0.91
    assert code_sim("\n\nreturn a + b", "return a+b") == 0.91
    # "abc" vs "abd": (6 - 2) / 6 = 66.67 -> 67 -> 0.67 (fuzzywuzzy rounds)
    assert code_sim("abc", "abd") == 0.67


def test_code_sim_empty_and_all_comments() -> None:
    assert code_sim("", "x = 1") == 0.0
    assert code_sim("# only\n// comments\n```", "x = 1") == 0.0
    # lcc is not first-line-cut by the scorer but code_sim picks its own line
    assert score_longbench("lcc", ["\n# c\nx = 1"], [["x = 1"]]) == 100.0


# ---------------------------------------------------------------- task table and errors
def test_task_map() -> None:
    # LongBench eval.py's dataset2metric: 21 tasks; LongBench-E: 13 of them as <task>_e
    assert len(LONGBENCH_TASKS) == 21 and len(LONGBENCH_E_TASKS) == 13 and len(PAPER_TASKS) == 12
    assert set(PAPER_TASKS) < set(LONGBENCH_TASKS) and set(LONGBENCH_E_TASKS) < set(LONGBENCH_TASKS)
    assert TASK_METRIC["qmsum"] is rouge_l and TASK_METRIC["repobench-p"] is code_sim
    assert TASK_METRIC["passage_count"] is count_score and TASK_METRIC["vcsum"] is rouge_zh
    assert TASK_METRIC["multifieldqa_zh"] is qa_f1_zh and TASK_METRIC["lsht"] is classification_score
    with pytest.raises(ValueError, match="no predictions"):
        score_longbench("qasper", [], [])
    with pytest.raises(ValueError, match="2 predictions vs 1"):
        score_longbench("qasper", ["a", "b"], [["a"]])


def test_every_longbench_task_scores_and_unknown_is_one_line() -> None:
    classes = ["体育", "财经", "City"]
    for task in (*LONGBENCH_TASKS, *(f"{t}_e" for t in LONGBENCH_E_TASKS)):
        gold = {"passage_retrieval_en": "Paragraph 2", "passage_retrieval_zh": "段落2",
                "passage_count": "2", "lsht": "体育", "trec": "City"}.get(base_task(task), "x = 2")
        pred = {"passage_retrieval_en": "2", "passage_retrieval_zh": "2"}.get(base_task(task), gold)
        assert score_longbench(task, [pred], [[gold]], classes) == 100.0, task
    for bad in ("poetry", "narrativeqa_e"):   # narrativeqa is not in LongBench-E
        with pytest.raises(ValueError) as e:
            score_example(bad, "x", ["x"])
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"unknown LongBench task '{bad}'")
        assert "passage_retrieval_zh" in msg and "<task>_e" in msg
    with pytest.raises(ValueError, match="lsht: all_classes is required"):
        score_longbench("lsht", ["体育"], [["体育"]])


def test_longbench_e_length_buckets() -> None:
    # lengths 100, 5000, 9000, 3999 -> buckets 0-4k rows 1 and 4, 4-8k row 2, 8k+ row 3
    got = score_longbench_e("qasper_e", ["x", "x", "y", "y"], [["x"], ["x"], ["x"], ["y z w"]],
                            [100, 5000, 9000, 3999])
    # last row: "y" vs "y z w": P = 1, R = 1/3 -> F1 = 0.5 -> 0-4k mean (1 + 0.5)/2 = 75.0
    assert got == {"0-4k": 75.0, "4-8k": 100.0, "8k+": 0.0}
    assert score_longbench_e("qasper_e", ["x"], [["x"]], [10]) == {"0-4k": 100.0}


def test_class_lists_from_column_or_prompts() -> None:
    rows = [{"answers": ["体育"], "prompt": "新闻：x\n类别：财经\n新闻：y\n类别：体育\n新闻：z"}]
    assert task_classes("lsht", rows) == ["体育", "财经"]
    assert task_classes("trec", [{"answers": ["City"], "prompt": "q\nType: Country\n",
                                  "all_classes": ["A", "B"]}]) == ["A", "B"]


# ---------------------------------------------------------------- RULER QA
def test_ruler_qa_reference_rule_takes_the_raw_first_line() -> None:
    assert ruler_qa_hit("  Frank Lowy was born in 1930.\nmore", ["frank lowy"])
    assert not ruler_qa_hit("I think\nFrank Lowy", ["Frank Lowy"])  # second line only
    # the raw first line of "\nFrank Lowy" is "" (the old rule stripped first and hit)
    assert not ruler_qa_hit("\nFrank Lowy", ["Frank Lowy"])
    assert score_ruler_qa(["\nFrank Lowy"], [["frank lowy"]], "string_match_part") == 100.0
    assert ruler_qa_hit("anything", [""])  # as upstream: '' is in every string
    # 2 hits of 3 -> 66.67 (rounded to 2 like RULER)
    got = score_ruler_qa(["Beijing", "it is 1082", "no idea"],
                         [["beijing"], ["February 1082", "1082"], ["time and storage"]])
    assert got == 66.67
    with pytest.raises(ValueError, match="unknown RULER QA metric 'f1'"):
        score_ruler_qa(["a"], [["a"]], "f1")

"""Hand-checked values of the upstream scorers on tricky predictions.

Each expected number was worked out by hand from the upstream definitions (LongBench
``LongBench/metrics.py`` + ``eval.py``; RULER ``scripts/eval/synthetic/constants.py`` +
``scripts/eval/evaluate.py``'s ``postprocess_pred``; the REFINE reference's
``verl/utils/reward_score/ruler.py``); the comment on each row says how.
"""
from __future__ import annotations

import pytest

from refine_ray.eval import metrics as M

TREC = ["loc", "location", "Other location", "City", "Country"]

# (scorer, prediction, gold, expected, derivation)
LONGBENCH_TABLE = [
    # ---- qa_f1_score: normalize_answer = lower, drop ASCII punctuation, drop \b(a|an|the)\b, split
    ("qa_f1", "", "Paris", 0.0, "no prediction tokens: num_same = 0 -> 0"),
    ("qa_f1", " \n\t ", "Paris", 0.0, "whitespace normalises to no tokens -> 0"),
    ("qa_f1", "The Eiffel Tower!", "eiffel tower", 1.0, "'!' and 'the' dropped: [eiffel, tower] == gold"),
    ("qa_f1", "a an the", "the", 0.0, "both normalise to []: num_same = 0 -> 0 (not 1)"),
    ("qa_f1", "the theatre", "theatre", 1.0, "\\b keeps 'theatre'; only the article goes"),
    ("qa_f1", "Café au lait", "cafe au lait", 2 / 3, "é not folded: common {au, lait}; P = R = 2/3"),
    ("qa_f1", "«Paris»", "Paris", 0.0, "« » are not string.punctuation: token '«paris»' != 'paris'"),
    ("qa_f1", "U.S.\nArmy", "US army", 1.0, "'.' dropped, split() eats the newline: [us, army]"),
    ("qa_f1", "dog dog dog", "dog", 0.5, "common = min(3, 1) = 1; P = 1/3, R = 1; F1 = (2/3)/(4/3)"),
    # ---- qa_f1_zh_score: jieba words, normalize_zh_answer each, drop empties
    ("qa_f1_zh", "北京。", "北京", 1.0, "jieba: [北京, 。]; '。' is CJK punctuation -> [北京] == gold"),
    ("qa_f1_zh", "", "北京", 0.0, "no words -> 0"),
    # ---- rouge_score: rouge 1.0.1 rouge-l f (sentences split on '.'), exceptions -> 0
    ("rouge_l", "", "a b", 0.0, "empty hypothesis: the package raises -> LongBench returns 0"),
    ("rouge_l", "   ", "a b", 0.0, "one sentence '' (word ''): LCS 0 -> P = R = 0 -> F = 0"),
    ("rouge_l", "The cat.", "the cat", 0.5, "hyp words {The, cat} (case kept), LCS {cat}: P = R = 1/2"),
    ("rouge_l", "a b\nc d", "a b c d", 1.0, "no '.': one sentence, whitespace squeezed -> identical"),
    ("rouge_l", "naïve café", "naive café", 0.5, "LCS {café}: P = R = 1/2"),
    # ---- rouge_zh_score: ' '.join(jieba.cut(x)) then rouge_score
    ("rouge_zh", "我爱北京天安门", "我爱北京", 6 / 7, "jieba: [我,爱,北京,天安门] vs [我,爱,北京]: P = 3/4, R = 1"),
    # ---- code_sim_score: first line (after lstrip('\\n')) without ` # //; fuzz.ratio / 100
    ("code_sim", "", "", 1.0, "fuzz.ratio checks equality (100) before emptiness"),
    ("code_sim", "", "x = 1", 0.0, "empty string -> 0"),
    ("code_sim", "\n\n    return x", "return x", 0.8, "line '    return x' (12) vs 8: indel 4; (20-4)/20"),
    ("code_sim", "\n\n```python\n# c\nfoo(a, b)", "foo(a,b)", 0.94, "skip ``` and #: indel 1; 16/17 = 94.1 -> 94"),
    ("code_sim", "abcdezzz", "abcdefgh", 0.62, "LCS 5: 100*10/16 = 62.5 -> round-half-even 62"),
    ("code_sim", "abczzzzz", "abcdefgh", 0.38, "LCS 3: 37.5 -> round-half-even 38"),
    ("code_sim", "# all\n// comments", "x", 0.0, "no code line -> '' vs 'x' -> 0"),
    # ---- count_score / retrieval_score: share of \\d+ numbers equal to the gold id
    ("count", "There are 3 paragraphs, not 13.", "3", 0.5, "numbers [3, 13]: 1 of 2"),
    ("count", "", "3", 0.0, "no numbers -> 0"),
    ("count", "３", "3", 0.0, "\\d matches the full-width digit; '３' != '3' -> 0/1"),
    ("retrieval", "Paragraph 1 or Paragraph 12", "Paragraph 12", 0.5, "id 12; numbers [1, 12]"),
    ("retrieval", "It is paragraph twelve.", "Paragraph 12", 0.0, "no numbers -> 0"),
    ("retrieval_zh", "答案是段落3", "段落3", 1.0, "id 3; numbers [3]"),
]
SCORERS = {"qa_f1": M.qa_f1, "qa_f1_zh": M.qa_f1_zh, "rouge_l": M.rouge_l, "rouge_zh": M.rouge_zh,
           "code_sim": M.code_sim, "count": M.count_score, "retrieval": M.retrieval_score,
           "retrieval_zh": M.retrieval_zh_score}


@pytest.mark.parametrize("scorer,pred,gold,expected,why", LONGBENCH_TABLE,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(LONGBENCH_TABLE)])
def test_longbench_metric_table(scorer, pred, gold, expected, why):
    # rouge's F = 2PR / (P + R + 1e-8): within 1e-7 of the exact fraction
    assert SCORERS[scorer](pred, gold) == pytest.approx(expected, abs=1e-7), why


# (task, prediction, golds, expected example score, derivation) through eval.py's scorer rules
EXAMPLE_TABLE = [
    ("triviaqa", "\n\nParis\nLondon", ["Paris"], 1.0, "lstrip('\\n') then first line 'Paris'"),
    ("triviaqa", "  \nParis", ["Paris"], 0.0, "lstrip only strips '\\n': first line '  ' -> 0"),
    ("hotpotqa", "\nParis\nLondon", ["Paris"], 2 / 3, "not cut: [paris, london]; P = 1/2, R = 1"),
    ("trec", "Country\nCity", ["City"], 0.0, "first line 'Country': City not matched -> 0"),
    ("trec", "city", ["City"], 0.0, "class matching is case-sensitive"),
    ("trec", "Other location", ["Other location"], 0.5,
     "matches [loc, location, Other location]; removing 'loc' while iterating shifts 'location' "
     "into the visited slot, so it survives: gold among 2 -> 1/2"),
    ("samsum", "the cat sat on the mat\nmore", ["the cat is on the mat"], 0.8,
     "first line; rouge-l: LCS {the,cat,on,mat} = 4 of 5 distinct each -> 0.8"),
    ("passage_count_e", "3", ["3"], 1.0, "LongBench-E name -> count_score"),
]


@pytest.mark.parametrize("task,pred,golds,expected,why", EXAMPLE_TABLE,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(EXAMPLE_TABLE)])
def test_longbench_example_table(task, pred, golds, expected, why):
    assert M.score_example(task, pred, golds, all_classes=TREC) == pytest.approx(expected, abs=1e-7), why


# RULER QA: (prediction, golds, reference first-line hit, string_match_part hit, derivation)
RULER_TABLE = [
    ("\nParis", ["paris"], 0, 1, "raw first line is '' for the reference; RULER scans everything"),
    ("  Paris  \nLondon", ["london"], 0, 1, "reference: first line '  Paris  '"),
    ("PARIS\x07is", ["paris"], 1, 1, "\\x07 -> '\\n' in postprocess; 'paris' still inside"),
    ("PARIS\x07is", ["paris is"], 0, 0, "'paris\\nis' does not contain 'paris is'"),
    ("", [""], 1, 1, "'' in '' is True upstream (empty gold always hits)"),
    (" \t ", ["x"], 0, 0, "postprocess gives '' -> no hit"),
    ("Ünïcode ß", ["üNÏCODE"], 1, 1, "str.lower handles Ü/Ï"),
]


@pytest.mark.parametrize("pred,golds,first,part,why", RULER_TABLE,
                         ids=[f"ruler-{i}" for i in range(len(RULER_TABLE))])
def test_ruler_qa_table(pred, golds, first, part, why):
    assert M.ruler_qa_hit(pred, golds) == bool(first), why
    assert M.string_match_part([pred], [golds]) == 100.0 * part, why
    assert M.score_ruler_qa([pred], [golds], "first_line") == 100.0 * first, why


def test_ruler_set_scores_round_like_upstream():
    # string_match_part: (1 + 0 + 0) / 3 * 100 = 33.333 -> round(., 2) = 33.33
    assert M.string_match_part(["a", "b", "c"], [["a"], ["x"], ["x"]]) == 33.33
    # first_line: hits [1, 0, 1] -> 66.67; string_match_part: [1, 1, 1] -> 100.0
    preds, golds = ["Beijing", "\n1082", "it is 1082\nno"], [["beijing"], ["1082"], ["1082"]]
    assert M.score_ruler_qa(preds, golds, "first_line") == 66.67
    assert M.score_ruler_qa(preds, golds, "string_match_part") == 100.0

"""LongBench and RULER-QA scoring, following the upstream scorers' definitions.

LongBench, two rules (``LONGBENCH_RULES``, ``eval.longbench_rule``; docs/evaluation.md):

* ``thudm`` (``LongBench/metrics.py`` and ``eval.py`` of THUDM/LongBench): per example, the
  max of the task metric over the gold answers, the prediction first cut to its first line
  for trec/triviaqa/samsum/lsht; a task reports ``round(100 * mean, 2)``. Every task of
  LongBench and LongBench-E (``<task>_e``) is supported with ``dataset2metric``'s metric;
  the Chinese tasks tokenise with jieba (imported only when one is scored).
* ``refine``: upstream ReFINE's scorer (``verl/utils/reward_score/longbench.py``), which
  produced the paper's LongBench numbers; its 14 tasks only (``REFINE_TASKS``). Same metrics
  and first-line cut, plus: the single/multi-doc QA tasks keep only the RAW first line
  (``split('\n')[0]``, nothing stripped before, so a leading newline leaves ''); QA F1, ROUGE
  and classification score the stripped prediction; ``code_sim`` scores the whole answer when
  no line qualifies (THUDM: ''). The strip changes no QA F1 or classification number
  (normalisation squeezes whitespace; no class name has edge whitespace) but does change ROUGE
  (``rouge`` counts the '' word of a whitespace-only piece after a '.'). Upstream ReFINE's
  hard-coded trec class list is the 50 classes ``task_classes`` gives on the release's file, and
  no class is inside another, so their order (which matters to LongBench's removal loop) cannot.

RULER QA: two named metrics (see ``RULER_QA_METRICS`` and docs/evaluation.md):
``first_line`` is upstream ReFINE's rule (``verl/utils/reward_score/ruler.py``),
which the paper's tables used; ``string_match_part`` is RULER's official QA metric
(``scripts/eval/synthetic/constants.py`` on ``postprocess_pred`` output).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rapidfuzz.distance import Indel

from refine_ray.eval.rouge import rouge_l_f

__all__ = [
    "normalize_answer", "normalize_zh_answer", "qa_f1", "qa_f1_zh", "rouge_l", "rouge_zh",
    "classification_score", "code_sim", "count_score", "retrieval_score", "retrieval_zh_score",
    "first_line", "TASK_METRIC", "FIRST_LINE_TASKS", "LONGBENCH_TASKS", "LONGBENCH_E_TASKS",
    "ZH_TASKS", "PAPER_TASKS", "PAPER_ABBREV", "base_task", "check_task", "max_gen_tokens",
    "LONGBENCH_RULES", "REFINE_TASKS", "check_rule", "prepare_prediction",
    "score_example", "score_longbench", "score_longbench_e", "task_classes",
    "ruler_postprocess", "ruler_qa_hit", "string_match_part",
    "RULER_QA_METRICS", "score_ruler_qa",
]

_PUNCT = set(string.punctuation)
_ZH_PUNCT = _PUNCT | set("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕"
                         "〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop articles a/an/the, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """LongBench's Chinese normalisation: lowercase, drop ASCII + CJK punctuation, drop all whitespace."""
    return "".join(ch for ch in text.lower() if ch not in _ZH_PUNCT and not ch.isspace())


def _token_f1(pred: list[str], gold: list[str]) -> float:
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, gold: str, **_: Any) -> float:
    """Token F1 between normalised prediction and gold (0-1)."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def _jieba_words(text: str) -> list[str]:
    try:
        import jieba
    except ImportError:  # a declared dependency; a broken install gets one line
        raise ValueError("the Chinese LongBench tasks need jieba (pip install jieba==0.42.1)") from None
    jieba.setLogLevel(30)  # its dictionary-loading banner is not an error
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh(prediction: str, gold: str, **_: Any) -> float:
    """LongBench ``qa_f1_zh_score``: F1 over jieba words, each zh-normalised, empties dropped (0-1)."""
    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in _jieba_words(text)) if w]
    return _token_f1(words(prediction), words(gold))


def rouge_l(prediction: str, gold: str, **_: Any) -> float:
    """ROUGE-L F as the ``rouge`` package computes it (see ``rouge.py``), 0-1."""
    return rouge_l_f(prediction, gold)


def rouge_zh(prediction: str, gold: str, **_: Any) -> float:
    """LongBench ``rouge_zh_score``: ROUGE-L F of the space-joined jieba words (0-1)."""
    return rouge_l_f(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(gold)))


def classification_score(prediction: str, gold: str, *, all_classes: Sequence[str] | None = None,
                         **_: Any) -> float:
    """LongBench's trec/lsht rule (case-sensitive substring matching).

    ``matches`` = class names occurring in the prediction (in ``all_classes`` order).
    LongBench then drops every match that is a proper substring of the gold, but it
    removes items from the list it is iterating over, so the element right after each
    removed one is not examined; that behaviour is reproduced here. Score is
    ``1 / len(matches)`` if the gold is among the remaining matches, else 0 (upstream's
    difflib fallback sits behind ``if em_match_list != 0``, always true, so it never runs).
    """
    if all_classes is None:
        raise ValueError("classification_score needs all_classes")
    matches = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(matches):
        term = matches[i]
        if term in gold and term != gold:
            del matches[i]  # the list shifts left; advancing i skips the next item
        i += 1
    return 1.0 / len(matches) if gold in matches else 0.0


def code_sim(prediction: str, gold: str, *, whole_if_no_line: bool = False, **_: Any) -> float:
    """LongBench ``code_sim_score``: fuzzy ratio of the first code line against the gold, 0-1.

    The first line (after stripping leading newlines) containing none of '`', '#', '//'
    is compared with the gold; if none qualifies the prediction is '' (THUDM), or the whole
    unstripped prediction with ``whole_if_no_line`` (upstream ReFINE). The ratio matches
    fuzzywuzzy's ``fuzz.ratio`` with the python-Levenshtein backend, which LongBench's
    numbers assume: ``int(round(100 * (|a| + |b| - indel(a, b)) / (|a| + |b|)))`` (Python's
    round-half-even), the indel distance counting a substitution as 2. fuzzywuzzy's
    pure-Python fallback (difflib.SequenceMatcher, no python-Levenshtein installed) gives
    different numbers on many pairs and is not reproduced. Like fuzzywuzzy, equal strings
    score 100 before the empty-string check, so an empty code line against an empty gold
    scores 1.0, and an empty line against a non-empty gold (or the reverse) scores 0.
    """
    line = prediction if whole_if_no_line else ""
    for cand in prediction.lstrip("\n").split("\n"):
        if "`" not in cand and "#" not in cand and "//" not in cand:
            line = cand
            break
    if line == gold:
        return 1.0
    if not line or not gold:
        return 0.0
    total = len(line) + len(gold)
    return int(round(100 * ((total - Indel.distance(line, gold)) / total))) / 100


def count_score(prediction: str, gold: str, **_: Any) -> float:
    """LongBench ``count_score`` (passage_count): share of the numbers in the prediction equal to the gold."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(gold) for n in numbers) / len(numbers) if numbers else 0.0


def _retrieval(prediction: str, gold: str, pattern: str) -> float:
    found = re.findall(pattern, gold)
    if not found:
        raise ValueError(f"retrieval gold {gold[:40]!r} has no paragraph id (expected {pattern!r})")
    return count_score(prediction, found[0])


def retrieval_score(prediction: str, gold: str, **_: Any) -> float:
    """LongBench ``retrieval_score`` (passage_retrieval_en): gold 'Paragraph N'; share of numbers == N."""
    return _retrieval(prediction, gold, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, gold: str, **_: Any) -> float:
    """LongBench ``retrieval_zh_score`` (passage_retrieval_zh): gold '段落N'; share of numbers == N."""
    return _retrieval(prediction, gold, r"段落(\d+)")


Metric = Callable[..., float]

# LongBench eval.py dataset2metric, in its order.
TASK_METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "multifieldqa_zh": qa_f1_zh,
    "hotpotqa": qa_f1, "2wikimqa": qa_f1, "musique": qa_f1, "dureader": rouge_zh,
    "gov_report": rouge_l, "qmsum": rouge_l, "multi_news": rouge_l, "vcsum": rouge_zh,
    "trec": classification_score, "triviaqa": qa_f1, "samsum": rouge_l, "lsht": classification_score,
    "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score, "lcc": code_sim, "repobench-p": code_sim,
}
LONGBENCH_TASKS: tuple[str, ...] = tuple(TASK_METRIC)
# LongBench-E (pred.py --e): these tasks, files/tasks named '<task>_e', same metrics.
LONGBENCH_E_TASKS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
    "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
ZH_TASKS: frozenset[str] = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})
FIRST_LINE_TASKS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})
CLASSIFICATION_TASKS: frozenset[str] = frozenset({"trec", "lsht"})
# Paper's 12 tasks (no gov_report, no musique), in the paper's column order.
PAPER_ABBREV: dict[str, str] = {
    "narrativeqa": "NQ", "qasper": "QR", "multifieldqa_en": "MF", "hotpotqa": "HP",
    "2wikimqa": "2W", "qmsum": "QM", "multi_news": "MN", "samsum": "SS", "trec": "TC",
    "triviaqa": "TQ", "lcc": "LC", "repobench-p": "RP",
}
PAPER_TASKS: tuple[str, ...] = tuple(PAPER_ABBREV)


def base_task(task: str) -> str:
    """The LongBench task behind a name: 'qasper_e' -> 'qasper' (LongBench-E), else unchanged."""
    if task.endswith("_e") and task[:-2] in LONGBENCH_E_TASKS:
        return task[:-2]
    return task


def check_task(task: str) -> str:
    """``base_task(task)``, or a one-line ValueError naming the supported tasks."""
    base = base_task(task)
    if base not in TASK_METRIC:
        raise ValueError(f"unknown LongBench task {task!r}; supported: {', '.join(LONGBENCH_TASKS)} "
                         f"and LongBench-E's <task>_e for {', '.join(LONGBENCH_E_TASKS)}")
    return base


def first_line(text: str) -> str:
    """LongBench's cut: ``text.lstrip('\\n').split('\\n')[0]``."""
    return text.lstrip("\n").split("\n")[0]


def max_gen_tokens(row: Mapping[str, Any]) -> int:
    """Generation budget of a LongBench row (its ``max_gen_tokens`` column)."""
    return int(row["max_gen_tokens"])


LONGBENCH_RULES: tuple[str, ...] = ("thudm", "refine")
# Upstream ReFINE's compute_score: its dataset2metric tasks, and those cut to the raw first line.
REFINE_TASKS: frozenset[str] = frozenset({
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "samsum",
    "qmsum", "multi_news", "trec", "triviaqa", "lcc", "repobench-p"})
_RAW_FIRST_LINE_TASKS = frozenset({"narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique"})
_CODE_TASKS = frozenset({"lcc", "repobench-p"})


def check_rule(task: str, rule: str) -> str:
    """``check_task(task)``, and a one-line ValueError for an unknown ``rule`` or a task the rule does not score."""
    base = check_task(task)
    if rule not in LONGBENCH_RULES:
        raise ValueError(f"unknown LongBench rule {rule!r}; use one of {', '.join(LONGBENCH_RULES)}")
    if rule == "refine" and base not in REFINE_TASKS:
        raise ValueError(f"eval.longbench_rule=refine: upstream ReFINE's scorer has no rule for {task!r} "
                         f"(it scores {', '.join(sorted(REFINE_TASKS))}); use eval.longbench_rule=thudm")
    return base


def prepare_prediction(task: str, prediction: str, rule: str = "thudm") -> str:
    """The text a rule hands to the task metric: LongBench's first-line cut for trec/triviaqa/samsum/lsht;
    with ``rule='refine'`` also the raw first line for the QA tasks and a strip for every non-code task."""
    base = check_rule(task, rule)
    if base in FIRST_LINE_TASKS:
        prediction = first_line(prediction)
    elif rule == "refine" and base in _RAW_FIRST_LINE_TASKS:
        prediction = prediction.split("\n")[0]
    if rule == "refine" and base not in _CODE_TASKS:
        prediction = prediction.strip()
    return prediction


def score_example(task: str, prediction: str, answers: Iterable[str],
                  all_classes: Sequence[str] | None = None, rule: str = "thudm") -> float:
    """One example's score (0-1) under ``rule``: max of the task metric over the gold answers.

    Raises ValueError (one line) for an unknown task or rule, a task the rule does not score,
    or a missing class list."""
    base = check_rule(task, rule)
    prediction = prepare_prediction(task, prediction, rule)
    metric = TASK_METRIC[base]
    extra = {"whole_if_no_line": True} if rule == "refine" and base in _CODE_TASKS else {}
    best = 0.0
    for gold in answers:
        best = max(best, metric(prediction, gold, all_classes=all_classes, **extra))
    return best


def check_predictions(name: str, predictions: Sequence[str], answers: Sequence[Any]) -> None:
    """One-line errors for a prediction list that does not pair up with its answers, or is empty."""
    if len(predictions) != len(answers):
        raise ValueError(f"{name}: {len(predictions)} predictions vs {len(answers)} answer lists")
    if not predictions:
        raise ValueError(f"{name}: no predictions to score")


def _check_classes(task: str, all_classes: Sequence[str] | None) -> None:
    if base_task(task) in CLASSIFICATION_TASKS and all_classes is None:
        raise ValueError(f"{task}: all_classes is required (see task_classes)")


def score_longbench(task: str, predictions: Sequence[str], answers_list: Sequence[Iterable[str]],
                    all_classes: Sequence[str] | None = None, rule: str = "thudm") -> float:
    """Task score in 0-100 under ``rule``, rounded to 2 decimals as LongBench's ``scorer`` does."""
    check_rule(task, rule)
    check_predictions(task, predictions, answers_list)
    _check_classes(task, all_classes)
    total = sum(score_example(task, p, a, all_classes, rule) for p, a in zip(predictions, answers_list))
    return round(100 * total / len(predictions), 2)


def score_longbench_e(task: str, predictions: Sequence[str], answers_list: Sequence[Iterable[str]],
                      lengths: Sequence[int], all_classes: Sequence[str] | None = None,
                      rule: str = "thudm") -> dict[str, float]:
    """LongBench-E's ``scorer_e`` (LongBench ``eval.py``): scores (0-100, 2 decimals) by the
    rows' context ``lengths`` (words; characters for Chinese), bucket '0-4k' (< 4000), '4-8k'
    (< 8000), '8k+'. A bucket without rows is left out (upstream reports numpy's NaN mean
    there). Raises ValueError (one line) on an unknown task, mismatched list lengths or a
    classification task without ``all_classes``. Called by ``refine-ray eval`` for ``<task>_e``
    files with a ``length`` column; ``rule`` as ``score_example``."""
    check_rule(task, rule)
    check_predictions(task, predictions, answers_list)
    if len(lengths) != len(predictions):
        raise ValueError(f"{task}: {len(lengths)} lengths vs {len(predictions)} predictions")
    _check_classes(task, all_classes)
    buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for p, a, n in zip(predictions, answers_list, lengths):
        key = "0-4k" if n < 4000 else "4-8k" if n < 8000 else "8k+"
        buckets[key].append(score_example(task, p, a, all_classes, rule))
    return {k: round(100 * sum(v) / len(v), 2) for k, v in buckets.items() if v}


# Few-shot label lines of the trec ("Type: X") and lsht ("类别：X") prompts.
_LABEL_LINE = {"trec": re.compile(r"^Type: (.+?)\s*$", re.MULTILINE),
               "lsht": re.compile(r"^类别：(.+?)\s*$", re.MULTILINE)}


def task_classes(task: str, rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The label set of a classification task (trec, lsht).

    LongBench's own ``all_classes`` column when the rows have one; else derived from the
    data: every gold answer plus every few-shot label line of the prompts, sorted. On
    ``trec_16384.parquet`` (no class column) this gives the 50 LongBench classes (gold
    answers alone cover only 35).
    """
    rows = list(rows)
    if rows and rows[0].get("all_classes"):
        return list(rows[0]["all_classes"])
    pattern = _LABEL_LINE[base_task(task)]
    classes: set[str] = set()
    for row in rows:
        classes.update(str(a) for a in row["answers"])
        classes.update(pattern.findall(row["prompt"]))
    classes.discard("")
    return sorted(classes)


# ---------------------------------------------------------------- RULER QA
_CONTROL = re.compile(r"[\x00-\x1f]")


def ruler_postprocess(text: str) -> str:
    """RULER's ``postprocess_pred``: strip, turn control characters (\\x00-\\x1f) into '\\n', strip."""
    return _CONTROL.sub("\n", text.strip()).strip()


def ruler_qa_hit(prediction: str, answers: Iterable[str]) -> bool:
    """Upstream ReFINE's RULER-QA reward (``ruler.py``, the paper's metric).

    The first line of the RAW response (``split('\\n')[0]``: a response starting with a
    newline has an empty first line) is post-processed as RULER does, then any gold,
    case-insensitive, as a substring is a hit. As upstream, an empty gold string always hits.
    """
    line = ruler_postprocess(prediction.split("\n")[0]).lower()
    return any(a.lower() in line for a in answers)


def string_match_part(preds: Sequence[str], refs: Sequence[Iterable[str]]) -> float:
    """RULER's official QA metric on ``ruler_postprocess``-ed responses, 0-100 rounded to 2:
    mean over rows of max over golds of (gold.lower() in pred.lower())."""
    check_predictions("ruler qa", preds, refs)
    hits = 0.0
    for pred, ref in zip(preds, refs):
        low = ruler_postprocess(pred).lower()
        hits += max(1.0 if r.lower() in low else 0.0 for r in ref)
    return round(hits / len(preds) * 100, 2)


def _first_line_score(preds: Sequence[str], refs: Sequence[Iterable[str]]) -> float:
    check_predictions("ruler qa", preds, refs)
    return round(100.0 * sum(ruler_qa_hit(p, a) for p, a in zip(preds, refs)) / len(preds), 2)


# name -> scorer (0-100). 'first_line' = the paper's tables; results keep it under the plain key.
RULER_QA_METRICS: dict[str, Callable[[Sequence[str], Sequence[Iterable[str]]], float]] = {
    "first_line": _first_line_score, "string_match_part": string_match_part,
}


def score_ruler_qa(preds: Sequence[str], answers: Sequence[Iterable[str]], metric: str = "first_line") -> float:
    """RULER SQuADQA/HotpotQA score, 0-100 rounded to 2, with a metric of ``RULER_QA_METRICS``."""
    if metric not in RULER_QA_METRICS:
        raise ValueError(f"unknown RULER QA metric {metric!r}; use one of {', '.join(RULER_QA_METRICS)}")
    return RULER_QA_METRICS[metric](preds, answers)

"""LongBench and RULER-QA scoring, following LongBench's ``metrics.py``/``eval.py`` rules.

Per example, LongBench takes the max of the task metric over the gold answers, first
cutting the prediction to its first line for trec/triviaqa/samsum/lsht, and reports
``round(100 * mean, 2)``.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rapidfuzz import fuzz

from refine_ray.eval.rouge import rouge_l_f

__all__ = [
    "normalize_answer", "qa_f1", "rouge_l", "classification_score", "code_sim",
    "first_line", "TASK_METRIC", "FIRST_LINE_TASKS", "LONGBENCH_TASKS", "PAPER_TASKS",
    "PAPER_ABBREV", "max_gen_tokens", "score_example", "score_longbench",
    "trec_classes", "score_longbench_rows", "ruler_qa_hit", "score_ruler_qa",
]

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop articles a/an/the, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _token_f1(pred: list[str], gold: list[str]) -> float:
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, gold: str, **_: Any) -> float:
    """Token F1 between normalised prediction and gold (0-1)."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def rouge_l(prediction: str, gold: str, **_: Any) -> float:
    """ROUGE-L F as the ``rouge`` package computes it (see ``rouge.py``), 0-1."""
    return rouge_l_f(prediction, gold)


def classification_score(prediction: str, gold: str, *, all_classes: Sequence[str] | None = None,
                         **_: Any) -> float:
    """LongBench's trec rule (case-sensitive substring matching).

    ``matches`` = class names occurring in the prediction (in ``all_classes`` order).
    LongBench then drops every match that is a proper substring of the gold, but it
    removes items from the list it is iterating over, so the element right after each
    removed one is not examined; that behaviour is reproduced here. Score is
    ``1 / len(matches)`` if the gold is among the remaining matches, else 0.
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


def code_sim(prediction: str, gold: str, **_: Any) -> float:
    """LongBench ``code_sim_score``: fuzz ratio of the first code line, 0-1.

    The first line (after stripping leading newlines) containing none of '`', '#', '//'
    is compared with the gold; if none qualifies the prediction is ''. LongBench uses
    fuzzywuzzy's ``fuzz.ratio`` (Levenshtein-backed): an integer, rounded, 0 when either
    string is empty. rapidfuzz's ratio is the same quantity unrounded, so it is rounded.
    """
    line = ""
    for cand in prediction.lstrip("\n").split("\n"):
        if "`" not in cand and "#" not in cand and "//" not in cand:
            line = cand
            break
    if not line or not gold:
        return 0.0
    return int(round(fuzz.ratio(line, gold))) / 100


Metric = Callable[..., float]

TASK_METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "hotpotqa": qa_f1,
    "2wikimqa": qa_f1, "musique": qa_f1, "triviaqa": qa_f1,
    "gov_report": rouge_l, "qmsum": rouge_l, "multi_news": rouge_l, "samsum": rouge_l,
    "trec": classification_score,
    "lcc": code_sim, "repobench-p": code_sim,
}
LONGBENCH_TASKS: tuple[str, ...] = tuple(TASK_METRIC)
FIRST_LINE_TASKS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})
# Paper's 12 tasks (no gov_report, no musique), in the paper's column order.
PAPER_ABBREV: dict[str, str] = {
    "narrativeqa": "NQ", "qasper": "QR", "multifieldqa_en": "MF", "hotpotqa": "HP",
    "2wikimqa": "2W", "qmsum": "QM", "multi_news": "MN", "samsum": "SS", "trec": "TC",
    "triviaqa": "TQ", "lcc": "LC", "repobench-p": "RP",
}
PAPER_TASKS: tuple[str, ...] = tuple(PAPER_ABBREV)


def first_line(text: str) -> str:
    """LongBench's cut: ``text.lstrip('\\n').split('\\n')[0]``."""
    return text.lstrip("\n").split("\n")[0]


def max_gen_tokens(row: Mapping[str, Any]) -> int:
    """Generation budget of a LongBench row (its ``max_gen_tokens`` column)."""
    return int(row["max_gen_tokens"])


def score_example(task: str, prediction: str, answers: Iterable[str],
                  all_classes: Sequence[str] | None = None) -> float:
    """One example's score (0-1): max of the task metric over the gold answers."""
    if task not in TASK_METRIC:
        raise KeyError(f"unknown LongBench task {task!r}; known: {', '.join(LONGBENCH_TASKS)}")
    if task in FIRST_LINE_TASKS:
        prediction = first_line(prediction)
    metric = TASK_METRIC[task]
    best = 0.0
    for gold in answers:
        best = max(best, metric(prediction, gold, all_classes=all_classes))
    return best


def check_predictions(name: str, predictions: Sequence[str], answers: Sequence[Any]) -> None:
    """One-line errors for a prediction list that does not pair up with its answers, or is empty."""
    if len(predictions) != len(answers):
        raise ValueError(f"{name}: {len(predictions)} predictions vs {len(answers)} answer lists")
    if not predictions:
        raise ValueError(f"{name}: no predictions to score")


def score_longbench(task: str, predictions: Sequence[str], answers_list: Sequence[Iterable[str]],
                    all_classes: Sequence[str] | None = None) -> float:
    """Task score in 0-100, rounded to 2 decimals as LongBench does."""
    check_predictions(task, predictions, answers_list)
    if task == "trec" and all_classes is None:
        raise ValueError("trec: all_classes is required (see trec_classes)")
    total = sum(score_example(task, p, a, all_classes) for p, a in zip(predictions, answers_list))
    return round(100 * total / len(predictions), 2)


_TYPE_LINE = re.compile(r"^Type: (.+?)\s*$", re.MULTILINE)


def trec_classes(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The trec label set, derived from the data since the parquet has no class column.

    Union of every gold answer and every ``Type: <label>`` line of the few-shot
    examples in the prompts, sorted. On ``trec_16384.parquet`` this gives the 50
    LongBench classes (gold answers alone cover only 35).
    """
    classes: set[str] = set()
    for row in rows:
        classes.update(str(a) for a in row["answers"])
        classes.update(_TYPE_LINE.findall(row["prompt"]))
    classes.discard("")
    return sorted(classes)


def score_longbench_rows(rows: Sequence[Mapping[str, Any]], predictions: Sequence[str]) -> float:
    """Score predictions for rows of one LongBench file (task from the rows, trec classes
    derived with ``trec_classes``), 0-100."""
    tasks = {row["task"] for row in rows}
    if len(tasks) != 1:
        raise ValueError(f"rows must come from one task, got {sorted(tasks)}")
    task = tasks.pop()
    classes = trec_classes(rows) if task == "trec" else None
    return score_longbench(task, predictions, [row["answers"] for row in rows], classes)


def ruler_qa_hit(prediction: str, answers: Iterable[str]) -> bool:
    """True if any non-empty gold (case-insensitive) is in the response's first line.

    The first line is taken after stripping surrounding whitespace.
    """
    line = prediction.strip().split("\n")[0].lower()
    return any(a.strip() and a.lower() in line for a in answers)


def score_ruler_qa(preds: Sequence[str], answers: Sequence[Iterable[str]]) -> float:
    """RULER SQuADQA/HotpotQA score, 0-100 (mean of ``ruler_qa_hit``)."""
    check_predictions("ruler qa", preds, answers)
    return 100.0 * sum(ruler_qa_hit(p, a) for p, a in zip(preds, answers)) / len(preds)

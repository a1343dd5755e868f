"""Paper-style markdown tables and a bar plot from eval result JSON files.

A result file is ``{"run_name": str, "<task>": score, ...}`` (scores 0-100); the task
scores may instead sit under a ``"scores"`` object. LongBench tasks use their LongBench
names; RULER / NIAH scores use ``<task>_<length>`` keys, e.g. ``ruler_squadqa_4096`` or
``niah_multikey_8192``. RULER QA has two metrics: ``ruler_squadqa_4096`` (the REFINE
reference's first-line rule, the paper's) and ``ruler_squadqa_string_match_part_4096``
(RULER's official); both get columns, and the table says which is which. A LongBench-E
task's ``"<task>_e_by_length": {"0-4k": .., "4-8k": .., "8k+": ..}`` object gets its own
table beside the task's overall ``<task>_e`` score.

    python -m refine_ray.eval.tables results/*.json --out table.md --plot plot.png
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from refine_ray.eval.metrics import PAPER_ABBREV, PAPER_TASKS

__all__ = ["Result", "load_result", "longbench_table", "ruler_table", "longbench_e_table", "render", "plot",
           "main"]

_LENGTH_KEY = re.compile(r"^(?P<task>(?:ruler|niah)_[A-Za-z0-9_\-]+?)_(?P<length>\d+)$")
E_BUCKETS = ("0-4k", "4-8k", "8k+")   # LongBench-E's scorer_e context-length buckets


class Result:
    """One run's scores: ``name``, ``scores`` (task -> 0-100) and ``by_length``
    (LongBench-E task -> bucket -> 0-100)."""

    def __init__(self, name: str, scores: dict[str, float],
                 by_length: dict[str, dict[str, float]] | None = None) -> None:
        self.name, self.scores, self.by_length = name, scores, by_length or {}

    def ruler(self) -> dict[tuple[str, int], float]:
        """(task, length) -> score for the ``<task>_<length>`` keys."""
        out = {}
        for key, val in self.scores.items():
            m = _LENGTH_KEY.match(key)
            if m:
                out[(m["task"], int(m["length"]))] = val
        return out


def load_result(path: str | Path) -> Result:
    """Read one result JSON; one-line ValueError naming the file on bad content."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path.name}: cannot read result JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name}: expected a JSON object")
    name = str(obj.get("run_name") or path.stem)
    raw = obj["scores"] if isinstance(obj.get("scores"), dict) else obj
    scores: dict[str, float] = {}
    by_length: dict[str, dict[str, float]] = {}
    for key, val in raw.items():  # numbers are scores; anything else is metadata
        if key != "run_name" and isinstance(val, (int, float)) and not isinstance(val, bool):
            scores[key] = float(val)
        elif key.endswith("_by_length") and isinstance(val, dict):
            by_length[key.removesuffix("_by_length")] = {b: float(val[b]) for b in E_BUCKETS if b in val}
    if not scores:
        raise ValueError(f"{path.name}: no numeric task scores")
    return Result(name, scores, by_length)


def _fmt(x: float | None, digits: int) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def longbench_table(results: Sequence[Result], digits: int = 1) -> str:
    """Paper's 12 LongBench tasks + their average; '*' marks an average over fewer tasks."""
    header = ["Run", *(PAPER_ABBREV[t] for t in PAPER_TASKS), "Avg"]
    rows = []
    for r in results:
        vals = [r.scores.get(t) for t in PAPER_TASKS]
        have = [v for v in vals if v is not None]
        avg = _fmt(_mean(have), digits) + ("" if len(have) == len(PAPER_TASKS) or not have
                                           else f"* ({len(have)}/{len(PAPER_TASKS)})")
        rows.append([r.name, *(_fmt(v, digits) for v in vals), avg])
    return _md(header, rows)


def _ruler_columns(results: Sequence[Result]) -> dict[str, list[int]]:
    cols: dict[str, set[int]] = {}
    for r in results:
        for task, length in r.ruler():
            cols.setdefault(task, set()).add(length)
    return {t: sorted(ls) for t, ls in sorted(cols.items())}


def _short(task: str) -> str:
    return task.removeprefix("ruler_")


def _klen(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def ruler_table(results: Sequence[Result], digits: int = 1) -> str:
    """RULER/NIAH scores by length, plus each task's average over its lengths."""
    cols = _ruler_columns(results)
    if not cols:
        return ""
    header = ["Run"]
    for task, lengths in cols.items():
        header += [f"{_short(task)} {_klen(n)}" for n in lengths] + [f"{_short(task)} avg"]
    rows = []
    for r in results:
        rs, row = r.ruler(), [r.name]
        for task, lengths in cols.items():
            vals = [rs.get((task, n)) for n in lengths]
            have = [v for v in vals if v is not None]
            avg = _fmt(_mean(have), digits) + ("*" if have and len(have) < len(vals) else "")
            row += [_fmt(v, digits) for v in vals] + [avg]
        rows.append(row)
    return _md(header, rows)


def longbench_e_table(results: Sequence[Result], digits: int = 1) -> str:
    """LongBench-E tasks by context length (0-4k / 4-8k / 8k+) and overall; '' when none."""
    tasks = sorted({t for r in results for t in r.by_length})
    if not tasks:
        return ""
    header = ["Run", *(f"{t} {b}" for t in tasks for b in (*E_BUCKETS, "all"))]
    rows = []
    for r in results:
        row = [r.name]
        for t in tasks:
            buckets = r.by_length.get(t, {})
            row += [_fmt(buckets.get(b), digits) for b in E_BUCKETS] + [_fmt(r.scores.get(t), digits)]
        rows.append(row)
    return _md(header, rows)


def render(results: Sequence[Result], digits: int = 1) -> str:
    """Full markdown document: LongBench table and (if any) RULER and LongBench-E tables."""
    parts = ["## LongBench (paper's 12 tasks)", "", longbench_table(results, digits)]
    if any(r.scores.get(t) is None for r in results for t in PAPER_TASKS):
        parts += ["", "`–` = missing; `*` = average over the tasks present only."]
    rt = ruler_table(results, digits)
    if rt:
        parts += ["", "## RULER by length", "", rt]
        if "string_match_part" in rt or any(k.startswith("ruler_") for r in results for k in r.scores):
            parts += ["", "RULER QA: `<task>` columns use the REFINE reference's first-line rule (the paper's "
                      "tables); `<task>_string_match_part` columns use RULER's official metric over the whole "
                      "response. See docs/evaluation.md."]
    et = longbench_e_table(results, digits)
    if et:
        parts += ["", "## LongBench-E by context length", "", et, "",
                  "Buckets as LongBench's `scorer_e` (row `length` < 4000, < 8000, else); `–` = no rows."]
    return "\n".join(parts) + "\n"


def plot(results: Sequence[Result], path: str | Path) -> None:
    """Grouped bar plot (one bar per run) of LongBench tasks + Avg and RULER cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[str], list[list[float]]]] = []
    labels = [PAPER_ABBREV[t] for t in PAPER_TASKS] + ["Avg"]
    lb = []
    for r in results:
        vals = [r.scores.get(t, math.nan) for t in PAPER_TASKS]
        have = [v for v in vals if not math.isnan(v)]
        lb.append(vals + [_mean(have) if have else math.nan])
    panels.append(("LongBench", labels, lb))
    cols = _ruler_columns(results)
    if cols:
        keys = [(t, n) for t, ls in cols.items() for n in ls]
        panels.append(("RULER", [f"{_short(t)}\n{_klen(n)}" for t, n in keys],
                       [[r.ruler().get(k, math.nan) for k in keys] for r in results]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.9 * len(labels) + 2), 4 * len(panels)),
                             squeeze=False)
    width = 0.8 / max(1, len(results))
    for ax, (title, xl, data) in zip(axes[:, 0], panels):
        for i, (r, vals) in enumerate(zip(results, data)):
            ax.bar([x + (i - (len(results) - 1) / 2) * width for x in range(len(xl))], vals,
                   width=width, label=r.name)
        ax.set_xticks(range(len(xl)))
        ax.set_xticklabels(xl, fontsize=8)
        ax.set_ylabel("score")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the markdown table; optionally write it (--out) and a plot (--plot)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="result JSON files, one per run")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--plot", help="write a bar plot PNG here")
    ap.add_argument("--digits", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        results = [load_result(p) for p in args.results]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = render(results, args.digits)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

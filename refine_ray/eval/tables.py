"""Paper-style markdown tables and a bar plot from eval result JSON files.

A result file is ``{"run_name": str, "<task>": score, ...}`` (scores 0-100); the task
scores may instead sit under a ``"scores"`` object. LongBench tasks use their LongBench
names; RULER / NIAH scores use ``<task>_<length>`` keys, e.g. ``ruler_squadqa_4096`` or
``niah_multikey_8192``. RULER QA has two metrics: ``ruler_squadqa_4096`` (upstream
ReFINE's first-line rule, the paper's) and ``ruler_squadqa_string_match_part_4096``
(RULER's official); both get columns, and the table says which is which. A LongBench-E
task's ``"<task>_e_by_length": {"0-4k": .., "4-8k": .., "8k+": ..}`` object gets its own
table beside the task's overall ``<task>_e`` score. The LongBench rule that scored a run
(``meta.longbench_rule``: ``thudm`` or ``refine``, see docs/evaluation.md) is a column of the
LongBench table; every table is followed by a legend of its column codes. Missing scores are
``–`` in tables and marked ``n/a`` (no bar) in the plot. ``eval``'s resume sidecars
(``<run>.settings.json`` beside ``<run>.predictions.jsonl``) are skipped, so ``results/*.json``
works; the files written are named on stderr (stdout is the markdown).

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

__all__ = ["Result", "load_result", "is_eval_sidecar", "longbench_table", "ruler_table", "longbench_e_table",
           "render", "figure", "plot", "main"]

_LENGTH_KEY = re.compile(r"^(?P<task>(?:ruler|niah)_[A-Za-z0-9_\-]+?)_(?P<length>\d+)$")
E_BUCKETS = ("0-4k", "4-8k", "8k+")   # LongBench-E's scorer_e context-length buckets


class Result:
    """One run's scores: ``name``, ``scores`` (task -> 0-100), ``by_length`` (LongBench-E task ->
    bucket -> 0-100) and ``rule``, the LongBench rule that scored it (None: not recorded)."""

    def __init__(self, name: str, scores: dict[str, float],
                 by_length: dict[str, dict[str, float]] | None = None, rule: str | None = None) -> None:
        self.name, self.scores, self.by_length, self.rule = name, scores, by_length or {}, rule

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
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    rule = meta.get("longbench_rule")
    return Result(name, scores, by_length, rule if isinstance(rule, str) else None)


def is_eval_sidecar(path: str | Path) -> bool:
    """``<run>.settings.json`` written by ``refine-ray eval`` beside ``<run>.predictions.jsonl`` (not a result)."""
    path = Path(path)
    return path.name.endswith(".settings.json") and \
        path.with_name(path.name.removesuffix(".settings.json") + ".predictions.jsonl").is_file()


def _fmt(x: float | None, digits: int) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def longbench_table(results: Sequence[Result], digits: int = 1) -> str:
    """Paper's 12 LongBench tasks + their average and the rule that scored them; '*' marks an average
    over fewer tasks, '?' a rule the result file does not record."""
    header = ["Run", "Rule", *(PAPER_ABBREV[t] for t in PAPER_TASKS), "Avg"]
    rows = []
    for r in results:
        vals = [r.scores.get(t) for t in PAPER_TASKS]
        have = [v for v in vals if v is not None]
        avg = _fmt(_mean(have), digits) + ("" if len(have) == len(PAPER_TASKS) or not have
                                           else f"* ({len(have)}/{len(PAPER_TASKS)})")
        rows.append([r.name, r.rule or "?", *(_fmt(v, digits) for v in vals), avg])
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


_LB_LEGEND = ("Columns: " + ", ".join(f"{PAPER_ABBREV[t]} = {t}" for t in PAPER_TASKS) + " (each with "
              "LongBench's metric for it); Avg = their mean. Rule = the LongBench scorer: `thudm` (LongBench's "
              "eval.py) or `refine` (upstream ReFINE's, which gave the paper's numbers); `?` = not recorded. "
              "`–` = missing; `*` = average over the tasks present only. Scores 0-100; see docs/evaluation.md.")
_RULER_LEGEND = ("Columns: `<task> <length>` = the score at that context length in tokens (K = 1024); "
                 "`<task> avg` = its mean over the lengths shown (`*`: over fewer lengths). `squadqa` / "
                 "`hotpotqa` = RULER QA with upstream ReFINE's first-line rule (the paper's tables), "
                 "`<task>_string_match_part` = the same answers under RULER's own QA metric over the whole "
                 "response; `niah_*` = RULER's NIAH tasks under RULER's `string_match_all`. `–` = missing.")


def render(results: Sequence[Result], digits: int = 1) -> str:
    """Full markdown document: LongBench table and (if any) RULER and LongBench-E tables, each with a legend."""
    parts = ["## LongBench (paper's 12 tasks)", "", longbench_table(results, digits), "", _LB_LEGEND]
    rules = {r.rule for r in results if any(t in r.scores for t in PAPER_TASKS)}
    if len(rules) > 1:
        parts += ["", "**The runs were scored under different rules: compare rows with the same Rule only.**"]
    rt = ruler_table(results, digits)
    if rt:
        parts += ["", "## RULER by length", "", rt, "", _RULER_LEGEND]
    et = longbench_e_table(results, digits)
    if et:
        parts += ["", "## LongBench-E by context length", "", et, "",
                  "Columns: `<task> <bucket>` = the task's score over rows whose context `length` (words; characters "
                  "for Chinese) is < 4000 (0-4k), < 8000 (4-8k) or more (8k+), LongBench's `scorer_e`; `all` = every "
                  "row. `–` = no rows."]
    return "\n".join(parts) + "\n"


def figure(results: Sequence[Result]):
    """Grouped bar plot (one bar per run, labelled with its LongBench rule) of LongBench tasks + Avg and
    RULER cells, as a matplotlib Figure; every cell is labelled with its value, a missing one has no bar
    and the label ``n/a`` (so it never reads as a 0)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

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
    fig = Figure(figsize=(max(8, 0.9 * len(labels) + 2), 4 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)
    width = 0.8 / max(1, len(results))
    for ax, (title, xl, data) in zip(axes[:, 0], panels):
        handles = []
        for i, (r, vals) in enumerate(zip(results, data)):
            xs = [x + (i - (len(results) - 1) / 2) * width for x in range(len(xl))]
            have = [(x, v) for x, v in zip(xs, vals) if not math.isnan(v)]
            ax.bar([x for x, _ in have], [v for _, v in have], width=width, color=f"C{i}")
            for x, v in zip(xs, vals):   # every cell says its value; a missing one says n/a and has no bar
                ax.text(x, (0 if math.isnan(v) else v) + 1, "n/a" if math.isnan(v) else f"{v:.1f}", rotation=90,
                        ha="center", va="bottom", fontsize=7, color="0.45" if math.isnan(v) else "0.1")
            handles.append(Patch(color=f"C{i}", label=f"{r.name} [{r.rule or '?'}]" if title == "LongBench"
                                 else r.name))
        ax.set_xticks(range(len(xl)))
        ax.set_xticklabels(xl, fontsize=8)
        ax.set_xlim(-0.6, len(xl) - 0.4)   # whole groups, bars or not
        ax.set_ylabel("score (0-100)")
        ax.set_ylim(0, 110)
        ax.set_title(title + ("; n/a = not evaluated" if any(math.isnan(v) for d in data for v in d) else ""))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    return fig


def plot(results: Sequence[Result], path: str | Path) -> None:
    """Write ``figure(results)`` as a PNG."""
    figure(results).savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the markdown table; optionally write it (--out) and a plot (--plot)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="result JSON files, one per run")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--plot", help="write a bar plot PNG here")
    ap.add_argument("--digits", type=int, default=1)
    args = ap.parse_args(argv)
    paths = [p for p in args.results if not is_eval_sidecar(p)]
    for p in args.results:
        if is_eval_sidecar(p):
            print(f"skipped {p} (refine-ray eval's resume settings, not a result)", file=sys.stderr)
    try:
        if not paths:
            raise ValueError("no result files (give eval's --out JSON files)")
        results = [load_result(p) for p in paths]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = render(results, args.digits)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out} (markdown tables)", file=sys.stderr)
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot} (bar plot)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

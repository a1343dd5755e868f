"""What ``refine-ray eval`` prints and names: the summary line, per-family means, the default run name.

Scores of different families (LongBench's task metrics under a rule, RULER QA's two metrics,
NIAH's ``string_match_all``) are on different scales and never averaged together; each
result key's family comes from ``meta.scorers`` (``refine_ray.eval.evaluate.scorer_of``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

__all__ = ["family_means", "summary_line", "default_run_name"]


def family_means(result: dict[str, Any]) -> dict[str, tuple[float, int]]:
    """Mean score and count per metric family of a result, from ``meta.scorers``: ``longbench[<rule>]``
    (the paper's LongBench average over tasks), ``ruler_qa/first_line``, ``ruler_qa/string_match_part``,
    ``niah/string_match_all``. Families are never averaged together (different metrics and scales)."""
    groups: dict[str, list[float]] = {}
    for key, sc in result["meta"]["scorers"].items():
        v = result.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            label = f"longbench[{sc['rule']}]" if sc["family"] == "longbench" else f"{sc['family']}/{sc['metric']}"
            groups.setdefault(label, []).append(float(v))
    return {k: (sum(v) / len(v), len(v)) for k, v in groups.items()}


def summary_line(result: dict[str, Any], out: Optional[Path]) -> str:
    """The one line ``eval`` prints: every score (0-100), each metric family's mean (``family_means``),
    rows, TTT mode, time, and where the result was written."""
    scores = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    meta = result["meta"]
    parts = [f"{k}={v:.2f}" for k, v in scores.items()]
    means = [f"{label}={m:.2f} ({n} {'task' if label.startswith('longbench') else 'set'}{'s' * (n > 1)})"
             for label, (m, n) in family_means(result).items()]
    tm = meta["ttt_metrics"]
    ttt = meta["ttt"]["mode"]
    if ttt != "none":
        ttt += (f" x{meta['ttt']['steps']} {'accumulate' if meta['ttt']['accumulate'] else 'reset'}"
                f" fallback={int(tm.get('ttt/ntp_fallback_prompts', 0))}")
    rows = sum(s["rows"] for s in meta["sets"].values())
    where = f" -> {out}" if out else ""
    return (f"{result['run_name']}: {' '.join(parts)} | means: {', '.join(means)} | {rows} rows; ttt {ttt}; "
            f"{meta['seconds']:.1f}s{where}")


# directory names that say nothing about the run: walk up past them for the default run name
_GENERIC_DIR = re.compile(r"(export|hf|hf_export|model|final|latest|checkpoints?|(global_)?step_?\d+)", re.I)


def default_run_name(model: str, ttt_mode: str) -> str:
    """``<label>-ttt_<mode>``: ``tiny_<type>`` for ``tiny:TYPE``; for a model directory its name, or
    the first meaningful folder above it (``outputs/<run>/export`` and ``outputs/<run>/hf`` -> ``<run>``)."""
    if model.startswith("tiny:"):
        label = "tiny_" + model.split(":", 1)[1]
    else:
        p = Path(model).absolute()
        while _GENERIC_DIR.fullmatch(p.name) and p.parent != p:
            p = p.parent
        label = p.name or "model"
    return f"{label}-ttt_{ttt_mode}"

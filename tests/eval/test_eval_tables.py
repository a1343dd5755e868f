"""Result tables and plot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from refine_ray.eval.metrics import PAPER_TASKS
from refine_ray.eval.tables import figure, load_result, main


def _write(path: Path, obj: dict) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def test_main_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # run A: the 12 paper tasks score 1..12 -> avg 78/12 = 6.5; gov_report/musique ignored
    a = {"run_name": "lact_refine", **{t: float(i + 1) for i, t in enumerate(PAPER_TASKS)},
         "gov_report": 99.0, "musique": 99.0,
         "ruler_squadqa_4096": 45.5, "ruler_squadqa_8192": 25.5, "niah_single_1_4096": 96.0,
         "meta": {"longbench_rule": "refine"}}
    # run B: 6 tasks of 10.0 (nested under "scores") -> "10.0* (6/12)"
    b = {"run_name": "deltanet", "scores": {t: 10.0 for t in PAPER_TASKS[:6]},
         "model": "delta_net"}
    out, png = tmp_path / "t.md", tmp_path / "p.png"
    rc = main([_write(tmp_path / "a.json", a), _write(tmp_path / "b.json", b),
               "--out", str(out), "--plot", str(png)])
    assert rc == 0
    md = out.read_text()
    captured = capsys.readouterr()
    assert md == captured.out
    assert captured.err.splitlines() == [f"wrote {out} (markdown tables)", f"wrote {png} (bar plot)"]
    lines = md.splitlines()
    assert "| Run | Rule | NQ | QR | MF | HP | 2W | QM | MN | SS | TC | TQ | LC | RP | Avg |" in lines
    row_a = next(line for line in lines if line.startswith("| lact_refine | refine | 1.0 |"))
    assert row_a.endswith("| 12.0 | 6.5 |")
    assert any(line.startswith("| deltanet | ? |") and "10.0* (6/12)" in line for line in lines)
    # RULER: squadqa avg (45.5 + 25.5) / 2 = 35.5; niah_single_1 at 4K only
    assert "| Run | niah_single_1 4K | niah_single_1 avg | squadqa 4K | squadqa 8K | squadqa avg |" in lines
    assert "| lact_refine | 96.0 | 96.0 | 45.5 | 25.5 | 35.5 |" in lines
    assert "| deltanet | – | – | – | – | – |" in lines
    # every table has a legend of its codes
    assert "NQ = narrativeqa, QR = qasper" in md and "RP = repobench-p" in md and "`refine` (upstream ReFINE's" in md
    assert "`<task> <length>` = the score at that context length" in md and "`niah_*` = RULER's NIAH" in md
    assert "compare rows with the same Rule only" in md        # a refine row beside an unrecorded one
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_marks_missing_scores_as_missing(tmp_path: Path) -> None:
    """A score that is not there gets no bar and an n/a label; a real 0 gets its bar and the label 0.0."""
    a = load_result(_write(tmp_path / "a.json", {"run_name": "a", "narrativeqa": 0.0, "qasper": 50.0}))
    ax = figure([a]).axes[0]
    assert [round(b.get_x() + b.get_width() / 2) for b in ax.patches] == [0, 1, 12]     # NQ, QR, Avg
    assert [b.get_height() for b in ax.patches] == [0.0, 50.0, 25.0]
    labels = {round(t.get_position()[0]): t.get_text() for t in ax.texts}
    assert labels == {0: "0.0", 1: "50.0", **{x: "n/a" for x in range(2, 12)}, 12: "25.0"}
    assert "n/a = not evaluated" in ax.get_title() and ax.get_legend().get_texts()[0].get_text() == "a [?]"


def test_eval_sidecars_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """results/*.json after an eval holds run.json and eval's run.settings.json (beside run.predictions.jsonl)."""
    res = _write(tmp_path / "run.json", {"run_name": "r", "qasper": 3.0})
    side = _write(tmp_path / "run.settings.json", {"model": "tiny"})
    (tmp_path / "run.predictions.jsonl").write_text("")
    assert main([res, side]) == 0
    captured = capsys.readouterr()
    assert f"skipped {side} (refine-ray eval's resume settings, not a result)" in captured.err
    assert "| r | ? |" in captured.out
    assert main([side]) == 2 and "no result files" in capsys.readouterr().err


def test_bad_result_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main([str(bad)]) == 2
    assert "bad.json: cannot read result JSON" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no numeric task scores"):
        load_result(_write(tmp_path / "e.json", {"run_name": "x"}))
    # run name falls back to the file stem
    assert load_result(_write(tmp_path / "run7.json", {"qasper": 3})).name == "run7"

"""Result tables and plot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from refine_ray.eval.metrics import PAPER_TASKS
from refine_ray.eval.tables import load_result, main


def _write(path: Path, obj: dict) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def test_main_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # run A: the 12 paper tasks score 1..12 -> avg 78/12 = 6.5; gov_report/musique ignored
    a = {"run_name": "lact_refine", **{t: float(i + 1) for i, t in enumerate(PAPER_TASKS)},
         "gov_report": 99.0, "musique": 99.0,
         "ruler_squadqa_4096": 45.5, "ruler_squadqa_8192": 25.5, "niah_single_4096": 96.0}
    # run B: 6 tasks of 10.0 (nested under "scores") -> "10.0* (6/12)"
    b = {"run_name": "deltanet", "scores": {t: 10.0 for t in PAPER_TASKS[:6]},
         "model": "delta_net"}
    out, png = tmp_path / "t.md", tmp_path / "p.png"
    rc = main([_write(tmp_path / "a.json", a), _write(tmp_path / "b.json", b),
               "--out", str(out), "--plot", str(png)])
    assert rc == 0
    md = out.read_text()
    assert md == capsys.readouterr().out
    lines = md.splitlines()
    assert "| Run | NQ | QR | MF | HP | 2W | QM | MN | SS | TC | TQ | LC | RP | Avg |" in lines
    row_a = next(line for line in lines if line.startswith("| lact_refine | 1.0 |"))
    assert row_a.endswith("| 12.0 | 6.5 |")
    assert any(line.startswith("| deltanet |") and "10.0* (6/12)" in line for line in lines)
    # RULER: squadqa avg (45.5 + 25.5) / 2 = 35.5; niah single at 4K only
    assert "| Run | niah_single 4K | niah_single avg | squadqa 4K | squadqa 8K | squadqa avg |" in lines
    assert "| lact_refine | 96.0 | 96.0 | 45.5 | 25.5 | 35.5 |" in lines
    assert "| deltanet | – | – | – | – | – |" in lines
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_result_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main([str(bad)]) == 2
    assert "bad.json: cannot read result JSON" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no numeric task scores"):
        load_result(_write(tmp_path / "e.json", {"run_name": "x"}))
    # run name falls back to the file stem
    assert load_result(_write(tmp_path / "run7.json", {"qasper": 3})).name == "run7"

"""Eval parquet loaders on the real shared data and on malformed files."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refine_ray.eval.data import DataError, load_longbench, load_ruler, ruler_file_info
from refine_ray.eval.metrics import LONGBENCH_TASKS, score_longbench, task_classes

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")

ROWS = {"2wikimqa": 185, "gov_report": 16, "hotpotqa": 96, "lcc": 488, "multi_news": 193,
        "multifieldqa_en": 143, "musique": 17, "narrativeqa": 61, "qasper": 191, "qmsum": 109,
        "repobench-p": 320, "samsum": 155, "trec": 200, "triviaqa": 127}
GEN = {"2wikimqa": 32, "hotpotqa": 32, "musique": 32, "triviaqa": 32, "lcc": 64,
       "repobench-p": 64, "multifieldqa_en": 64, "trec": 64, "narrativeqa": 128, "qasper": 128,
       "samsum": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512}


@needs_data
def test_real_longbench_files() -> None:
    files = {p.stem.rsplit("_", 1)[0]: p for p in sorted((DATA / "longbench").glob("*.parquet"))}
    # the release's 14 tasks ({task}_16384.parquet), all among LongBench's 21 scored ones
    assert set(files) == set(ROWS) and set(files) < set(LONGBENCH_TASKS)
    for task, path in files.items():
        rows = load_longbench(path)
        assert len(rows) == ROWS[task], task
        assert {r["task"] for r in rows} == {task}
        assert {r["max_gen_tokens"] for r in rows} == {GEN[task]}, task
        assert all(isinstance(r["answers"], list) and r["answers"] for r in rows)


@needs_data
def test_real_trec_classes_and_gold_scores() -> None:
    rows = load_longbench(DATA / "longbench" / "trec_16384.parquet")
    classes = task_classes("trec", rows)
    # gold answers cover 35 labels; the few-shot "Type:" lines complete LongBench's 50
    assert len(classes) == 50 and "Other location" in classes
    assert {a for r in rows for a in r["answers"]} <= set(classes)
    gold = [r["answers"][0] for r in rows]
    assert score_longbench("trec", gold, [r["answers"] for r in rows], classes) == 100.0
    # row 0's gold is "Other location"; predicting "Animal" there scores 0 -> 199/200 = 99.5
    assert gold[0] == "Other location"
    preds = ["Animal"] + gold[1:]
    assert score_longbench("trec", preds, [r["answers"] for r in rows], classes) == 99.5


@needs_data
def test_real_ruler_files() -> None:
    paths = sorted((DATA / "ruler").glob("ruler_*.parquet"))
    assert len(paths) == 8
    for path in paths:
        info = ruler_file_info(path)
        assert info["split"] == "test" and info["model"] in ("delta_net", "lact")
        rows = load_ruler(path)
        assert len(rows) == info["num_rows"] == 200
        assert {r["task"] for r in rows} == {info["task"]}
        assert all(r["answers"] == r["answer"] and r["answer"] for r in rows)


def test_ruler_file_info() -> None:
    info = ruler_file_info("ruler_squadqa_delta_net_8192_200_test.parquet")
    assert info == {"task": "ruler_squadqa", "model": "delta_net", "length": 8192,
                    "num_rows": 200, "split": "test"}
    with pytest.raises(DataError, match="name is not"):
        ruler_file_info("squad.parquet")


def _write(path: Path, cols: dict) -> Path:
    pq.write_table(pa.table(cols), path)
    return path


def test_missing_column(tmp_path: Path) -> None:
    p = _write(tmp_path / "ruler_x.parquet", {"prompt": ["q"], "answers": [["a"]]})
    with pytest.raises(DataError) as err:
        load_ruler(p)
    assert str(err.value) == "ruler_x.parquet: missing column 'answer' (expected prompt, answer)"
    p = _write(tmp_path / "lb.parquet", {"prompt": ["q"], "answers": [["a"]], "task": ["t"]})
    with pytest.raises(DataError, match=r"^lb.parquet: missing column 'max_gen_tokens'"):
        load_longbench(p)


def test_zero_rows(tmp_path: Path) -> None:
    table = pa.table({"prompt": pa.array([], pa.string()),
                      "answer": pa.array([], pa.list_(pa.string()))})
    pq.write_table(table, tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"^empty.parquet: no rows$"):
        load_ruler(tmp_path / "empty.parquet")


def test_bad_types_and_values(tmp_path: Path) -> None:
    p = _write(tmp_path / "s.parquet", {"prompt": ["q"], "answer": ["a"]})
    with pytest.raises(DataError, match="column 'answer' must be a list of strings"):
        load_ruler(p)
    p = _write(tmp_path / "e.parquet", {"prompt": ["q", ""], "answer": [["a"], ["b"]]})
    with pytest.raises(DataError, match="row 1 has an empty or null 'prompt'"):
        load_ruler(p)
    p = _write(tmp_path / "g.parquet", {"prompt": ["q"], "answers": [["a"]],
                                        "max_gen_tokens": [0], "task": ["qasper"]})
    with pytest.raises(DataError, match="bad 'max_gen_tokens'"):
        load_longbench(p)
    # LongBench-E's optional context length must be an integer >= 0
    lb = {"prompt": ["q", "r"], "answers": [["a"], ["b"]], "max_gen_tokens": [8, 8], "task": ["qasper_e"] * 2}
    ok = load_longbench(_write(tmp_path / "ok.parquet", {**lb, "length": [0, 9000]}))
    assert [r["length"] for r in ok] == [0, 9000]
    for bad, row in (([10, -1], 1), ([10, None], 1), ([10.0, 5.0], 0)):
        p = _write(tmp_path / "len.parquet", {**lb, "length": bad})
        with pytest.raises(DataError, match=rf"^len.parquet: row {row} has a bad 'length' .*integer >= 0\)$"):
            load_longbench(p)


def test_unreadable_and_absent(tmp_path: Path) -> None:
    bad = tmp_path / "junk.parquet"
    bad.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match=r"^junk.parquet: cannot read as parquet"):
        load_longbench(bad)
    with pytest.raises(DataError, match=r"^nope.parquet: no such file"):
        load_longbench(tmp_path / "nope.parquet")

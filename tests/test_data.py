"""Corpus loading on the real LongBench parquet and on malformed files."""
import numpy as np
import pandas as pd
import pytest

from refine_ray.config import DataConfig
from refine_ray.data import Corpus, DataCursor, DataError, load_tokenizer


def read_texts(cfg, tokenizer) -> list:
    """Open a corpus as the driver does (columns, then every value through the index) and return its
    texts, for comparison in these small tests."""
    corpus = Corpus(cfg, tokenizer)
    corpus.lengths()
    return list(corpus.dataset[corpus.text_column])


def _stream(cfg, tokenizer, min_tokens):
    corpus = Corpus(cfg, tokenizer)
    return corpus, DataCursor(corpus.lengths(), min_tokens, cfg.shuffle, cfg.seed)


def test_cursor_on_real_parquet_resumes_exactly(shared_data, tokenizer):
    cfg = DataConfig(path=str(shared_data / "longbench" / "gov_report_16384.parquet"), max_length=256, batch_size=2)
    corpus, cursor = _stream(cfg, tokenizer, 64)
    first = [corpus.document(r) for r in cursor.next_rows(3)]
    assert all(len(d.ids) == 256 and d.ids.dtype == np.int64 for d in first)   # gov reports are long
    saved = cursor.state_dict()
    expected = cursor.next_rows(20)                                              # crosses the epoch (16 rows)
    _, again = _stream(cfg, tokenizer, 64)
    again.load_state_dict(saved)
    assert again.next_rows(20) == expected
    assert cursor.epoch == 1 and len(set(expected[:13])) == 13                  # no row twice in an epoch


def test_truncation_sides(tmp_path, tokenizer):
    path = tmp_path / "t.parquet"
    text = " ".join(f"w{i}" for i in range(50))
    pd.DataFrame({"text": [text], "answer": [["w7", "other"]]}).to_parquet(path)
    full = Corpus(DataConfig(path=str(path), text_column="text", max_length=10_000), tokenizer).document(0).ids
    for side, expected in (("right", full[:9]), ("left", full[-9:]), ("middle", np.concatenate([full[:4], full[-5:]]))):
        doc = Corpus(DataConfig(path=str(path), text_column="text", max_length=9, truncation=side,
                                answer_column="answer", answer_max_tokens=1), tokenizer).document(0)
        np.testing.assert_array_equal(doc.ids, expected)
        assert len(doc.answer_ids) == 1                                          # first answer, truncated


def test_short_documents_are_counted_not_lost(tmp_path, tokenizer):
    path = tmp_path / "mixed.parquet"
    pd.DataFrame({"text": ["short", "word " * 100, "tiny", "more words " * 60]}).to_parquet(path)
    _, cursor = _stream(DataConfig(path=str(path), text_column="text", shuffle=False), tokenizer, 50)
    assert cursor.next_rows(2) == [1, 3] and cursor.skipped == 2


@pytest.mark.parametrize("frame, column, message", [
    (pd.DataFrame({"other": ["a"]}), "text", "data.text_column: 'text' not in"),
    (pd.DataFrame({"text": pd.Series([], dtype=str)}), "text", "has no rows"),
    (pd.DataFrame({"text": [1, 2]}), "text", "row 0 of"),
])
def test_bad_parquet(tmp_path, tokenizer, frame, column, message):
    path = tmp_path / "bad.parquet"
    frame.to_parquet(path)
    with pytest.raises(DataError, match=message):
        read_texts(DataConfig(path=str(path), text_column=column), tokenizer)


def test_bad_paths(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        read_texts(DataConfig(path=str(tmp_path / "nope.parquet")), tokenizer)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="holds no"):
        read_texts(DataConfig(path=str(tmp_path)), tokenizer)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_texts(DataConfig(path=str(garbage)), tokenizer)
    with pytest.raises(DataError, match="tokenizer.path"):
        load_tokenizer(str(tmp_path / "no-tokenizer"))


def _parts(tmp_path):
    """Three parquet parts and a stray jsonl, as a sharded export leaves them."""
    (tmp_path / "d").mkdir()
    for i in range(3):
        pd.DataFrame({"text": [f"part {i} row {j}" for j in range(2)]}).to_parquet(tmp_path / "d" / f"p-{i}.parquet")
    (tmp_path / "d" / "notes.jsonl").write_text('{"text": "not a part"}\n')
    return tmp_path / "d"


def test_glob_and_list_paths_as_datasets_data_files(tmp_path, monkeypatch, tokenizer):
    """data.path takes a glob or a list of files/globs (HF datasets' data_files forms), files in sorted order."""
    d = _parts(tmp_path)
    rows = [f"part {i} row {j}" for i in range(3) for j in range(2)]
    assert read_texts(DataConfig(path=str(d / "*.parquet"), text_column="text"), tokenizer) == rows
    monkeypatch.chdir(tmp_path)                                                  # relative globs: from the cwd
    assert read_texts(DataConfig(path="d/p-[12].parquet", text_column="text"), tokenizer) == rows[2:]
    listed = [str(d / "p-2.parquet"), "d/p-0*.parquet"]
    assert read_texts(DataConfig(path=listed, text_column="text"), tokenizer) == rows[4:] + rows[:2]
    with pytest.raises(DataError, match=r"data.path: 'd/\*.csv' matches no files"):
        read_texts(DataConfig(path="d/*.csv", text_column="text"), tokenizer)
    with pytest.raises(DataError, match="expected files of one type"):
        read_texts(DataConfig(path="d/*", text_column="text"), tokenizer)
    with pytest.raises(DataError, match="data.path: an empty list"):
        read_texts(DataConfig(path=[], text_column="text"), tokenizer)


def test_errors_name_the_file_and_its_row_when_a_glob_spans_files(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"data.text_column: row 1 of '.*b.jsonl' is NoneType, expected text"):
        read_texts(DataConfig(path=str(tmp_path / "*.jsonl"), text_column="text"), tokenizer)


def test_save_to_disk_directories(tmp_path, tokenizer):
    """A directory written by datasets' save_to_disk (a Dataset, or a DatasetDict's 'train' split) loads."""
    import datasets

    datasets.Dataset.from_dict({"text": ["a b c", "d e"], "answer": [["x"], ["y"]]}).save_to_disk(tmp_path / "ds")
    corpus = Corpus(DataConfig(path=str(tmp_path / "ds"), text_column="text", answer_column="answer"), tokenizer)
    assert [(d.answer, d.answer_ids.tolist()) for d in map(corpus.document, range(2))] == \
        [(["x"], tokenizer("x", add_special_tokens=False)["input_ids"]), (["y"], tokenizer("y", add_special_tokens=False)["input_ids"])]
    assert read_texts(DataConfig(path=str(tmp_path / "ds"), text_column="text"), tokenizer) == ["a b c", "d e"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]}),
                          "test": datasets.Dataset.from_dict({"text": ["u"]})}).save_to_disk(tmp_path / "dd")
    assert read_texts(DataConfig(path=str(tmp_path / "dd"), text_column="text"), tokenizer) == ["t"]
    datasets.DatasetDict({"a": datasets.Dataset.from_dict({"text": ["t"]}),
                          "b": datasets.Dataset.from_dict({"text": ["u"]})}).save_to_disk(tmp_path / "two")
    with pytest.raises(DataError, match="holds splits a, b; expected a 'train' split or a single split"):
        read_texts(DataConfig(path=str(tmp_path / "two"), text_column="text"), tokenizer)
    (tmp_path / "ds" / "state.json").write_text("{broken")
    with pytest.raises(DataError, match="cannot read .* as a datasets save_to_disk directory"):
        read_texts(DataConfig(path=str(tmp_path / "ds"), text_column="text"), tokenizer)


def test_all_too_short_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "short.jsonl"
    path.write_text('{"text": "a b"}\n{"text": "c"}\n')
    with pytest.raises(DataError, match="no document has the 100 tokens needed"):
        _stream(DataConfig(path=str(path), text_column="text"), tokenizer, 100)

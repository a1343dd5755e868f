"""Corpus-scale data (issue 23 point 2) and validation files too short to evaluate (issue 24 point 11).

The corpus is memory-mapped from datasets' Arrow cache, its token-count index is built once per
(file contents, tokenizer) and cached, the driver holds only that index and a scorer reads only
the rows it is given. Every test uses its own ``HF_DATASETS_CACHE`` (a tmp dir).
"""
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from refine_ray.config import DataConfig, load_config
from refine_ray.data import Corpus, DataCursor, DataError, load_tokenizer
from refine_ray.preflight import check_validation, preflight

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_deltanet_mid.yaml")


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """A datasets cache of this test's own, in this process and in the processes it starts."""
    import datasets

    cache = tmp_path / "hf_datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "paper", "green", "house"]
    return " ".join(rng.choice(vocab, n))


def _corpus(path: Path, docs: int, words: int = 300) -> Path:
    pd.DataFrame({"text": [_words(words + 7 * i, i) for i in range(docs)],
                  "answers": [[f"answer {i}"] for i in range(docs)]}).to_parquet(path, row_group_size=16)
    return path


FRESH_START = """
import json, os, sys
from refine_ray.config import DataConfig
from refine_ray.data import Corpus, load_tokenizer
corpus = Corpus(DataConfig(path=sys.argv[1], text_column="text", answer_column="answers", max_length=200,
                           num_proc=int(sys.argv[2])), load_tokenizer())
lengths = corpus.lengths()
corpus.check_answers()
files = corpus.index().cache_files + [f["filename"] for f in corpus.dataset.cache_files]
print(json.dumps({"lengths": lengths.tolist(), "files": {f: [os.stat(f).st_ino, os.stat(f).st_mtime_ns] for f in files}}))
"""


def _fresh_start(corpus: Path, num_proc: int) -> dict:
    out = subprocess.run([sys.executable, "-c", FRESH_START, str(corpus), str(num_proc)], capture_output=True,
                         text=True, cwd=ROOT, env=os.environ.copy(), timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_start_in_a_fresh_process_reuses_the_index(tmp_path, datasets_cache, tokenizer):
    """Built in parallel once; a second process maps the same cache files without writing any
    (same inode and mtime: neither the conversion nor the map ran again), also with another num_proc."""
    path = _corpus(tmp_path / "c.parquet", 40)
    first = _fresh_start(path, num_proc=2)
    index_files = [f for f in first["files"] if "refine_ray_index" in f]
    assert len(index_files) == 2 and all(str(datasets_cache) in f for f in first["files"])   # 2 map shards
    second = _fresh_start(path, num_proc=1)
    assert second == first
    expected = [min(len(tokenizer(t, add_special_tokens=False)["input_ids"]), 200)
                for t in pd.read_parquet(path)["text"]]
    assert first["lengths"] == expected                     # the count the old one-call tokenisation gave


def test_a_rewritten_corpus_is_read_and_indexed_again(tmp_path, tokenizer):
    """Same path, same size, modification time set back (as cp -p / rsync -a leave it): datasets'
    own key (path + mtime) would serve the old rows; the content key does not."""
    path = tmp_path / "c.jsonl"
    old_text, new_text = "alpha beta gamma delta", "a b c d e f g h i j kl"
    assert len(old_text) == len(new_text)
    path.write_text(json.dumps({"text": old_text}) + "\n")
    stat = path.stat()
    cfg = DataConfig(path=str(path), text_column="text")
    before = Corpus(cfg, tokenizer)
    assert before.lengths().tolist() == [4] and before.document(0).ids.size == 4
    path.write_text(json.dumps({"text": new_text}) + "\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    after = Corpus(cfg, tokenizer)
    assert after.dataset[0]["text"] == new_text
    assert after.lengths().tolist() == [len(tokenizer(new_text, add_special_tokens=False)["input_ids"])] != [4]
    assert after.index().cache_files != before.index().cache_files


def _second_start(cfg, tokenizer, rows) -> tuple[int, int, list]:
    """(peak Python bytes, Arrow bytes allocated, documents) of a second start's driver work (open,
    lengths, answer check) and a scorer's reading of ``rows``."""
    import pyarrow as pa

    Corpus(cfg, tokenizer).lengths()                                   # first start: conversion + index
    arrow_before = pa.total_allocated_bytes()
    tracemalloc.start()
    corpus = Corpus(cfg, tokenizer)
    lengths = corpus.lengths()
    corpus.check_answers()
    docs = [corpus.document(r) for r in rows]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [len(d.ids) for d in docs] == [lengths[r] for r in rows]
    return peak, pa.total_allocated_bytes() - arrow_before, corpus


def test_driver_and_scorer_hold_no_texts(tmp_path, tokenizer):
    """The memory of a second start (driver: open, index, checks; scorer: 3 documents) does not
    grow with the corpus: 10x the documents add under a tenth of their text in Python objects
    or Arrow buffers (the texts stay in the memory-mapped Arrow files)."""
    from datasets.table import MemoryMappedTable

    peaks, arrow, sizes = [], [], []
    for docs in (40, 400):
        path = _corpus(tmp_path / f"c{docs}.parquet", docs, words=2000)
        sizes.append(int(pd.read_parquet(path)["text"].str.len().sum()))
        cfg = DataConfig(path=str(path), text_column="text", answer_column="answers", max_length=4096)
        peak, allocated, corpus = _second_start(cfg, tokenizer, (5, 17, 33))
        peaks.append(peak)
        arrow.append(allocated)
    grown = sizes[1] - sizes[0]                                        # ~5 MB more text
    assert peaks[1] - peaks[0] < grown / 10, (peaks, sizes)
    assert max(arrow) < grown / 10, (arrow, sizes)
    assert isinstance(corpus.dataset.data, MemoryMappedTable) and not hasattr(corpus, "texts")


def test_corrupt_caches_are_rebuilt_with_one_line(tmp_path, tokenizer, caplog):
    """A truncated conversion and a garbled index file: rebuilt, one warning line each, same rows."""
    path = _corpus(tmp_path / "c.parquet", 20)
    cfg = DataConfig(path=str(path), text_column="text")
    corpus = Corpus(cfg, tokenizer)
    expected = corpus.lengths().tolist()
    index_file, arrow_file = corpus.index().cache_files[0], corpus.dataset.cache_files[0]["filename"]
    del corpus
    Path(index_file).write_bytes(b"garbage")
    data = Path(arrow_file).read_bytes()
    Path(arrow_file).write_bytes(data[:len(data) // 2])
    with caplog.at_level("WARNING", logger="refine_ray"):
        again = Corpus(cfg, tokenizer)
        assert again.lengths().tolist() == expected
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all(len(w.splitlines()) == 1 for w in warnings), warnings
    assert "Arrow cache" in warnings[0] and "token index" in warnings[1]
    assert [again.document(i).ids.size for i in range(3)] == [min(n, cfg.max_length) for n in expected[:3]]


def test_index_serves_any_max_length_and_resume_stays_exact(tmp_path, tokenizer):
    """Counts are stored untruncated: another data.max_length reuses the index; the cursor over
    the cached lengths resumes at the same rows as one built from scratch."""
    path = _corpus(tmp_path / "c.parquet", 30)
    long_ = Corpus(DataConfig(path=str(path), text_column="text", max_length=10_000), tokenizer)
    short = Corpus(DataConfig(path=str(path), text_column="text", max_length=320), tokenizer)
    assert short.index().cache_files == long_.index().cache_files
    np.testing.assert_array_equal(short.lengths(), np.minimum(long_.lengths(), 320))
    cursor = DataCursor(short.lengths(), 310, seed=3)
    cursor.next_rows(7)
    saved, expected = cursor.state_dict(), cursor.next_rows(40)
    again = DataCursor(Corpus(DataConfig(path=str(path), text_column="text", max_length=320), tokenizer).lengths(),
                       310, seed=3)
    again.load_state_dict(saved)
    assert again.next_rows(40) == expected and again.skipped == cursor.skipped > 0


def _val_config(tmp_path, val_docs: list[str], overrides=()):
    corpus = _corpus(tmp_path / "train.parquet", 4, words=200)
    pd.DataFrame({"text": val_docs}).to_parquet(tmp_path / "val.parquet")
    return load_config(CONFIG, ["data.text_column=text", f"data.path={corpus}", f"train.output_dir={tmp_path / 'out'}",
                                f"train.val_path={tmp_path / 'val.parquet'}", "train.val_every=1", "train.val_docs=2",
                                "train.val_cuts=8", "refine.min_prefix=20", "refine.response_length=5",
                                "refine.n_chunks=2", *overrides])


def test_validation_documents_too_short_for_the_fixed_cuts_stop_preflight(tmp_path, tokenizer):
    """Issue 24 point 11: 20 + (8 + 1) x 5 - 1 = 64 tokens needed; the first 2 documents have fewer
    (the long third is not among the val_docs=2 the evaluation reads): one line before the run."""
    cfg = _val_config(tmp_path, [_words(40, 0), _words(50, 1), _words(500, 2)])
    with pytest.raises(DataError) as e:
        preflight(cfg)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    for needle in (f"train.val_path '{tmp_path / 'val.parquet'}'", "0 of the first 2 documents",
                   "(train.val_docs=2)", "have the 64 tokens", "train.val_cuts=8", "the longest has 50",
                   "val/nsp_*"):
        assert needle in msg, (needle, msg)
    capped = _val_config(tmp_path, [_words(500, 2)], ["data.max_length=60"])
    with pytest.raises(DataError, match=r"the longest has 60 \(data.max_length=60\)"):
        check_validation(capped, tokenizer)
    check_validation(_val_config(tmp_path, [_words(40, 0), _words(70, 1)]), tokenizer)   # one qualifies: runs

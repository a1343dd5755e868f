"""Documents of a memory-mapped corpus, read row by row, and the driver's data position.

:class:`Corpus` opens ``data.path`` (:func:`~refine_ray.data.files.open_dataset`) and
tokenises the rows it is asked for; its :meth:`Corpus.lengths` come from the cached
token-count index (:mod:`refine_ray.data.index`), checked row by row without reading the
texts into memory. :class:`DataCursor` holds only integers: the driver owns the data
position, scorers (which may die and restart) read and score the rows they are given.
Documents shorter than ``min_tokens`` are skipped and counted, never silently dropped;
the stream is an epoch-wise permutation with an explicit position so a checkpoint
resumes at the exact next document.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from refine_ray.config import DataConfig
from refine_ray.data.files import DataError, data_files, locate_row, open_dataset
from refine_ray.data.index import CorpusIndex, corpus_index, first_answer

PROGRESS_MIN_BYTES = 64 << 20   # corpora from this size on show progress bars (smaller ones take ~1 s)


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


class Corpus:
    """The rows of ``data.path``, memory-mapped, tokenised on demand (no special tokens, truncated by
    ``data.truncation``). Holds no texts: a row is read from the mapped Arrow files when asked for."""

    def __init__(self, cfg: DataConfig, tokenizer, progress: bool = False):
        """Opens (on first use: converts) the corpus; ``progress``: show datasets' progress bars for
        the conversion and the index when the files hold at least :data:`PROGRESS_MIN_BYTES`.
        Raises DataError for an unreadable ``data.path`` or a missing column."""
        self.cfg, self.tokenizer = cfg, tokenizer
        _, self.files = data_files(cfg.path)
        self.progress = progress and sum(f.stat().st_size for p in self.files
                                         for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*"))
                                         if f.is_file()) >= PROGRESS_MIN_BYTES
        self.dataset = open_dataset(cfg.path, cfg.text_column, cfg.answer_column, self.progress)
        self.text_column = self.dataset.column_names[0]
        self._index: Optional[CorpusIndex] = None

    def __len__(self) -> int:
        return len(self.dataset)

    def document(self, row: int) -> Document:
        """Row ``row`` tokenised without special tokens and truncated by ``data.truncation``; with
        ``data.answer_column``, also its first answer's tokens. Reads that row only. Raises
        IndexError for a row out of range, DataError for a row whose text is not a string."""
        record = self.dataset[int(row)]
        text = record[self.text_column]
        if not isinstance(text, str):
            raise DataError(f"data.text_column: {locate_row(self.cfg.path, row)} is {type(text).__name__}, "
                            f"expected text")
        ids = truncate(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"],
                       self.cfg.max_length, self.cfg.truncation)
        answer, answer_ids = None, None
        if self.cfg.answer_column is not None:
            answer = record[self.cfg.answer_column]
            first = first_answer(answer, self.cfg.answer_column, row)
            answer_ids = np.asarray(self.tokenizer(first, add_special_tokens=False)["input_ids"]
                                    [:self.cfg.answer_max_tokens], dtype=np.int64)
        return Document(int(row), np.asarray(ids, dtype=np.int64), answer, answer_ids)

    def index(self) -> CorpusIndex:
        """The token counts of every row (:func:`~refine_ray.data.index.corpus_index`: built once per
        file contents and tokenizer with ``data.num_proc`` processes, cached on disk)."""
        if self._index is None:
            self._index = corpus_index(self.dataset, self.files, self.tokenizer, self.cfg.answer_column,
                                       self.cfg.num_proc, self.progress)
        return self._index

    def lengths(self) -> np.ndarray:
        """Token count of every row after truncation to ``data.max_length``, ``[rows]`` int64: the
        index the cursor filters on. Raises DataError naming the first row whose text is not a
        string (and its file), or when every text is empty."""
        tokens = self.index().tokens
        bad = np.flatnonzero(tokens < 0)
        if len(bad):
            value = self.dataset[int(bad[0])][self.text_column]
            raise DataError(f"data.text_column: {locate_row(self.cfg.path, int(bad[0]))} is "
                            f"{type(value).__name__}, expected text")
        if not tokens.any():
            raise DataError(f"data.text_column: all {len(tokens)} '{self.text_column}' values in "
                            f"'{self.cfg.path}' are empty or tokenise to no tokens (expected document "
                            f"text)")
        return np.minimum(tokens, self.cfg.max_length)

    def check_answers(self) -> None:
        """Every row's ``data.answer_column`` value is a string or a non-empty list of strings whose first
        item tokenises to at least one token (post-training trains on it). Raises DataError naming
        the first bad row, its file and the row within that file."""
        column = self.cfg.answer_column
        counts = self.index().answer_tokens
        if column is None or counts is None:
            return

        def where(i: int) -> tuple[int, str]:   # (row within its file, " in '<file>'")
            row, _, file = locate_row(self.cfg.path, i).partition(" of ")
            return int(row.split()[1]), f" in {file}"

        bad = np.flatnonzero(counts < 0)
        if len(bad):
            first_answer(self.dataset[int(bad[0])][column], column, *where(int(bad[0])))   # raises
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            row, file = where(int(empty[0]))
            value = first_answer(self.dataset[int(empty[0])][column], column, row)
            raise DataError(f"data.answer_column: row {row} of '{column}'{file} is {value!r:.40}, which "
                            f"tokenises to no tokens (expected a non-empty answer; {len(empty)} of "
                            f"{len(counts)} rows)")


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

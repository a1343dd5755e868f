"""The token-count index of a corpus: built once per (file contents, tokenizer), cached on disk.

:func:`corpus_index` runs ``Dataset.map(num_proc=...)`` over the memory-mapped corpus
(:func:`~refine_ray.data.files.open_dataset`) with :class:`TokenCounter` and keeps the result
in datasets' own cache format: Arrow files ``<HF_DATASETS_CACHE>/refine_ray_index/tokens-<key>*.arrow``
that the next start maps instead of tokenising again. The key is a sha256 of
:data:`INDEX_VERSION`, the files' :func:`~refine_ray.data.files.content_key`,
:func:`tokenizer_key` and the columns, given to ``map`` as its fingerprint: datasets' own
(the previous fingerprint hashed with the dill-pickled :class:`TokenCounter`) is also
stable across processes, but ours names exactly what decides the counts, and follows the
files also for a ``save_to_disk`` directory, whose fingerprint is whatever its
``state.json`` says. Counts are stored untruncated, so changing
``data.max_length`` or ``data.truncation`` reuses the index (the truncated length is
``min(count, max_length)`` whichever side is dropped).

Deliberately not in the key: ``data.num_proc`` (datasets reuses the shards of any earlier
process count). An index file that no longer reads, or holds fewer rows than the corpus,
is deleted and rebuilt with one warning line.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from refine_ray.data.files import DataError, content_key

INDEX_VERSION = 1               # the counting rule's version: bump it when TokenCounter changes
MAP_BATCH = 16                  # rows per tokenizer call in a map worker (16K-token documents: ~1M tokens)
ROWS_PER_PROCESS = 64           # auto num_proc: one process per this many rows, at most the CPUs we may use

log = logging.getLogger("refine_ray")


def first_answer(answer, column: str, row: int, where: str = "") -> str:
    """The answer trained on: a string, or the first of a list (as upstream ReFINE).

    ``where``: appended after the column in the error, e.g. `` in 'file'``. Raises DataError
    for anything else (None, an empty list, a list of non-strings)."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, (list, tuple, np.ndarray)) and len(answer) and isinstance(answer[0], str):
        return answer[0]
    raise DataError(f"data.answer_column: row {row} of '{column}'{where} is {type(answer).__name__} "
                    f"{answer!r:.60}, expected a string or a non-empty list of strings")


@dataclass
class CorpusIndex:
    """Per-row token counts of a corpus (no special tokens, before truncation)."""
    tokens: np.ndarray                    # [rows] int64; -1 where the text value is not a string
    answer_tokens: Optional[np.ndarray]   # [rows] int64 tokens of the first answer; -1: not a string or a
                                          # non-empty list of strings; None without data.answer_column
    cache_files: list[str]                # the Arrow files it was read from (or written to)


def tokenizer_key(tokenizer) -> str:
    """sha256 hex of what decides a tokenizer's token counts: class, ``name_or_path``, size, init
    arguments, the ``tokenizers``/``transformers`` versions and, for a fast tokenizer, its full
    serialization (vocabulary, normalizer, pre-tokenizer, model, added tokens: the ``tokenizers``
    JSON, which lists vocabularies in id order), without the truncation/padding state that calls
    set, else its vocabulary. Stable across processes and unaffected by earlier calls."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps([type(tokenizer).__name__, str(tokenizer.name_or_path), len(tokenizer),
                         tokenizers.__version__, transformers.__version__], default=str).encode())
    h.update(json.dumps(getattr(tokenizer, "init_kwargs", {}), sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:           # a copy: the tokenizer's own truncation/padding state stays as it is
        copy = tokenizers.Tokenizer.from_str(backend.to_str())
        copy.no_truncation(), copy.no_padding()
        h.update(copy.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


class TokenCounter:
    """The batched ``Dataset.map`` function of the index: per row, the token count of the text
    (``-1`` for a value that is not a string) and, with an answer column, of the first answer
    (``-1`` when :func:`first_answer` refuses the value). Tokenised as :class:`Corpus` does:
    no special tokens. Runs in datasets' worker processes (pickled with the tokenizer)."""

    def __init__(self, tokenizer, answer_column: Optional[str]):
        self.tokenizer, self.answer_column = tokenizer, answer_column

    def _count(self, texts: list) -> list[int]:
        keep = [i for i, t in enumerate(texts) if isinstance(t, str)]
        ids = self.tokenizer([texts[i] for i in keep], add_special_tokens=False, verbose=False)["input_ids"] \
            if keep else []
        counts = [-1] * len(texts)
        for i, x in zip(keep, ids):
            counts[i] = len(x)
        return counts

    def __call__(self, texts: list, answers: Optional[list] = None) -> dict[str, list[int]]:
        out = {"tokens": self._count(texts)}
        if self.answer_column is not None:
            firsts = []
            for a in answers:
                try:
                    firsts.append(first_answer(a, self.answer_column, 0))
                except DataError:
                    firsts.append(None)
            out["answer_tokens"] = self._count(firsts)
        return out


def index_dir() -> Path:
    """Where index files live: ``<HF_DATASETS_CACHE>/refine_ray_index`` (datasets' cache root,
    ``.cache/hf/datasets`` under scripts/env.sh)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "refine_ray_index"


def resolve_num_proc(num_proc: int, rows: int) -> int:
    """``data.num_proc``, or for 0 one process per :data:`ROWS_PER_PROCESS` rows, at most the CPUs
    this process may run on and at least 1."""
    if num_proc > 0:
        return min(num_proc, max(rows, 1))
    return max(1, min(len(os.sched_getaffinity(0)), rows // ROWS_PER_PROCESS))


def corpus_index(dataset, files: list[str], tokenizer, answer_column: Optional[str] = None, num_proc: int = 0,
                 progress: bool = False) -> CorpusIndex:
    """The :class:`CorpusIndex` of ``dataset`` (the memory-mapped corpus of ``files``; its first
    column is the text), read from its cache or built with ``num_proc`` processes
    (:func:`resolve_num_proc`) and cached (module doc; ``progress``: datasets' progress bar).

    Raises DataError when the index directory cannot be created, the map's own error when a
    fresh build fails; a cached index that fails to read is rebuilt once (warning line)."""
    import datasets

    columns = dataset.column_names
    key = hashlib.sha256(json.dumps([INDEX_VERSION, content_key(files), tokenizer_key(tokenizer), columns,
                                     answer_column]).encode()).hexdigest()[:32]
    cache_file = index_dir() / f"tokens-{key}.arrow"
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data: cannot create the token index directory '{cache_file.parent}' ({e.strerror}); "
                        f"set HF_DATASETS_CACHE to a writable directory") from None
    features = {"tokens": datasets.Value("int64")}
    if answer_column is not None:
        features["answer_tokens"] = datasets.Value("int64")
    procs = resolve_num_proc(num_proc, len(dataset))
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.enable_progress_bars() if progress else datasets.disable_progress_bars()
    try:
        for attempt in (0, 1):
            existing = sorted(glob.glob(f"{cache_file.with_suffix('')}*.arrow"))   # this key's shards, if any
            try:
                out = dataset.map(TokenCounter(tokenizer, answer_column), batched=True, batch_size=MAP_BATCH,
                                  input_columns=columns, remove_columns=columns, features=datasets.Features(features),
                                  num_proc=procs if procs > 1 else None,
                                  new_fingerprint=key, cache_file_name=str(cache_file), load_from_cache_file=True,
                                  desc=f"indexing {len(dataset)} documents (token counts)")
                if len(out) != len(dataset):
                    raise OSError(f"{len(out)} rows for a corpus of {len(dataset)}")
                break
            except Exception as e:
                if attempt or not existing:
                    raise
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                log.warning(f"data: the cached token index '{existing[0]}' is unreadable ({reason}); rebuilding it")
                for f in existing:
                    Path(f).unlink(missing_ok=True)
    finally:
        datasets.disable_progress_bars() if bars_were_off else datasets.enable_progress_bars()
    table = out.data
    answers = table.column("answer_tokens").to_numpy().astype(np.int64) if answer_column is not None else None
    return CorpusIndex(table.column("tokens").to_numpy().astype(np.int64), answers,
                       [f["filename"] for f in out.cache_files])

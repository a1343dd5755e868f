"""Loading of the LongBench / RULER evaluation parquet files as lists of dict rows.

Every failure is a ``DataError`` with one line naming the file and the problem, e.g.
``ruler_x.parquet: missing column 'answer' (expected prompt, answer)``.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DataError", "LONGBENCH_COLUMNS", "RULER_COLUMNS", "load_rows", "load_longbench",
    "load_ruler", "ruler_file_info",
]

LONGBENCH_COLUMNS: tuple[str, ...] = ("prompt", "answers", "max_gen_tokens", "task")
RULER_COLUMNS: tuple[str, ...] = ("prompt", "answer")


class DataError(ValueError):
    """An evaluation file is missing, unreadable, or malformed."""


def load_rows(path: str | Path, required: Sequence[str],
              list_columns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of ``path`` as dicts; checks required columns, non-empty, list-typed columns."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise DataError(f"{name}: no such file ({path})")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{name}: cannot read as parquet ({msg})") from exc
    expected = ", ".join(required)
    for col in required:
        if col not in table.column_names:
            raise DataError(f"{name}: missing column '{col}' (expected {expected})")
    if table.num_rows == 0:
        raise DataError(f"{name}: no rows")
    for col in list_columns:
        typ = table.schema.field(col).type
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
            raise DataError(f"{name}: column '{col}' must be a list of strings, got {typ}")
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise DataError(f"{name}: row {i} has an empty or null 'prompt'")
        for col in list_columns:
            if not row[col]:
                raise DataError(f"{name}: row {i} has an empty or null '{col}'")
    return rows


def load_longbench(path: str | Path) -> list[dict[str, Any]]:
    """A LongBench / LongBench-E file (columns prompt, answers, max_gen_tokens, task, ...).

    An optional ``length`` column (LongBench-E's context length: words, characters for
    Chinese) must hold integers >= 0; evaluation buckets ``<task>_e`` scores by it.
    Raises DataError (one line) on a bad ``max_gen_tokens`` or ``length``.
    """
    rows = load_rows(path, LONGBENCH_COLUMNS, list_columns=("answers",))
    for i, row in enumerate(rows):
        if row["max_gen_tokens"] is None or int(row["max_gen_tokens"]) <= 0:
            raise DataError(f"{Path(path).name}: row {i} has a bad 'max_gen_tokens' "
                            f"({row['max_gen_tokens']!r})")
        length = row.get("length", 0)
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise DataError(f"{Path(path).name}: row {i} has a bad 'length' ({length!r}; "
                            f"expected the context length, an integer >= 0)")
    return rows


def load_ruler(path: str | Path) -> list[dict[str, Any]]:
    """A RULER QA file (columns index, prompt, answer, ...); adds ``answers`` = ``answer``."""
    rows = load_rows(path, RULER_COLUMNS, list_columns=("answer",))
    for row in rows:
        row["answers"] = row["answer"]
    return rows


_RULER_NAME = re.compile(r"^ruler_(?P<task>[a-z0-9]+)_(?P<model>.+)_(?P<length>\d+)_"
                         r"(?P<n>\d+)_(?P<split>train|test)$")


def ruler_file_info(path: str | Path) -> dict[str, Any]:
    """Parse ``ruler_{task}_{model}_{length}_{n}_{split}.parquet`` into its fields."""
    m = _RULER_NAME.match(Path(path).stem)
    if m is None:
        raise DataError(f"{Path(path).name}: name is not ruler_<task>_<model>_<len>_<n>_<split>")
    return {"task": f"ruler_{m['task']}", "model": m["model"], "length": int(m["length"]),
            "num_rows": int(m["n"]), "split": m["split"]}


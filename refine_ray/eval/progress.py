"""Incremental, resumable evaluation output: ``<out>.predictions.jsonl`` + ``<out>.settings.json``.

After every answered batch the predictions file is rewritten atomically (temp file +
``os.replace``), so a crash, a kill or a failing row never loses the rows already answered
and scored. A re-run with the same ``--out`` skips the rows already there, but only if the
run's settings (model, tokenizer, model/refine/optim/reward config, eval options except
``limit``) are the ones stored in the settings file and each stored row's prompt hash
still matches; otherwise it refuses with one line (``EvalError``) and touches nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["PredictionLog", "prompt_hash", "write_atomic"]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prompt_hash(prompt: str) -> str:
    """A short stable fingerprint of a prompt (16 hex chars of SHA-1): a resumed run checks its rows are the same."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


class PredictionLog:
    """Rows answered so far, keyed by (set key, row index); ``save`` rewrites the file atomically."""

    def __init__(self, out: Path, settings: dict[str, Any], error: Callable[[str], Exception]):
        self.path = out.with_name(out.stem + ".predictions.jsonl")
        self.settings_path = out.with_name(out.stem + ".settings.json")
        self.error = error
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        self.records: dict[tuple[str, int], dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        name = self.path.name
        if not self.settings_path.is_file():
            raise self.error(f"{name}: exists without {self.settings_path.name}; cannot tell which run wrote it "
                             f"(use another --out or delete {name})")
        try:
            old = json.loads(self.settings_path.read_text())
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            raise self.error(f"{name}: cannot read the earlier run's output ({e})") from None
        a, b = _flat(old), _flat(self.settings)
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if diff:
            k = diff[0]
            raise self.error(f"{name}: refusing to resume: {k} was {a.get(k)!r}, now {b.get(k)!r} "
                             f"(use another --out, or delete {name} to start over)")
        self.records = {(r["set"], int(r["row"])): r for r in rows}

    def done(self, key: str, row: int, prompt: str) -> Optional[dict[str, Any]]:
        """The stored record of this row, checking its prompt is unchanged; None if not done."""
        rec = self.records.get((key, row))
        if rec is not None and rec.get("prompt_sha1") != prompt_hash(prompt):
            raise self.error(f"{self.path.name}: refusing to resume: {key} row {row} has a different prompt "
                             f"than in the earlier run (use another --out, or delete {self.path.name})")
        return rec

    def add(self, rec: dict[str, Any]) -> None:
        """Record one answered row (keyed by set and row; a row answered again replaces the old record)."""
        self.records[(rec["set"], int(rec["row"]))] = rec

    def save(self) -> None:
        """Write the settings (once) and all records atomically, so a crash never leaves a partial file."""
        if not self.settings_path.is_file():
            write_atomic(self.settings_path, json.dumps(self.settings, indent=2, sort_keys=True))
        write_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records.values()))

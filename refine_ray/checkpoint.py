"""Atomic, resumable checkpoints of a whole run.

Layout under ``<output_dir>/checkpoints/``::

    step_000012/            one complete checkpoint
        learner/ds/...      DeepSpeed: weights, optimizer, scheduler (every rank writes its shards)
        trainer.pt          step, weight version, data cursor, pending async experience
    latest                  text file naming the newest complete checkpoint

A checkpoint is written into ``step_N.tmp-<pid>`` and renamed into place only
once complete; ``latest`` is replaced atomically afterwards. A crash mid-save
leaves the previous checkpoint and ``latest`` untouched; stale ``*.tmp-*``
folders are removed at the next save.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch

LATEST = "latest"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not name or not path.is_dir():
        raise FileNotFoundError(f"checkpoint pointer '{pointer}' names {name!r}, which is not a checkpoint "
                                f"directory in '{root}' (expected step_N)")
    if not (path / "trainer.pt").is_file():
        raise FileNotFoundError(f"checkpoint '{path}' named by '{pointer}' is incomplete (no trainer.pt)")
    return path


def begin_save(output_dir: str | Path, step: int) -> tuple[Path, Path]:
    """(temporary folder to write into, final folder) for step ``step``."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp, final


def commit_save(tmp: Path, final: Path, trainer_state: dict, keep: int = 2) -> Path:
    """Write the trainer state last, move the folder into place, then point ``latest`` at it."""
    torch.save(trainer_state, tmp / "trainer.pt.partial")
    os.replace(tmp / "trainer.pt.partial", tmp / "trainer.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = final.parent / f"{LATEST}.tmp-{os.getpid()}"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, final.parent / LATEST)
    _prune(final.parent, keep)
    return final


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / "trainer.pt", weights_only=False)


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and ".tmp-" not in p.name)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)

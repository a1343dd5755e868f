"""A run directory belongs to one run: who may start, resume or replace it, and an exclusive lock.

Rules (checked read-only by :func:`plan_start` in preflight, then again under the lock):

* ``train.resume_from=<checkpoint>``: resume from it (a run dir, ``step_N`` or ``step_N/learner``);
  the output directory must be empty or the run that checkpoint belongs to.
* ``train.resume=true`` (default) with a checkpoint in ``checkpoints/latest``: resume from it.
* otherwise the run starts fresh, which needs an empty (or absent) output directory; a directory
  holding a run is replaced only with ``train.overwrite=true`` (moved aside atomically, then
  deleted, and said so), and a non-empty directory that is not a refine-ray run is never replaced.

The lock is ``fcntl.flock`` on ``<output_dir>/.lock`` for the whole run; the file records the
holder's pid, host and start time for the message a second run gets. A lock whose process died
is released by the kernel, so its leftover file is simply reclaimed. On network filesystems
flock is only as good as the filesystem's lock support (NFSv4 and Lustre with ``flock`` have it).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

from refine_ray import checkpoint as ckpt

log = logging.getLogger("refine_ray")

LOCK = ".lock"
RUN_MARKERS = ("config.json", "checkpoints", "metrics.jsonl", "tensorboard")


class RunDirError(ValueError):
    """The output directory cannot be used as asked; the message is one line naming the key."""


def holds_files(out: Path) -> bool:
    return out.is_dir() and any(p.name != LOCK for p in out.iterdir())


def looks_like_run(out: Path) -> bool:
    return any((out / m).exists() for m in RUN_MARKERS)


def plan_start(train) -> Optional[Path]:
    """The checkpoint a run with these ``train`` settings resumes from, or None for a fresh start.

    Raises:
        RunDirError: a fresh start into a directory holding files without ``train.overwrite``, an
            overwrite of something that is not a run, or ``resume_from`` that conflicts with the dir.
        checkpoint.CheckpointError: ``latest`` or ``resume_from`` names no checkpoint.
    """
    out = Path(train.output_dir)
    if train.resume_from:
        found = ckpt.find_checkpoint(train.resume_from)
        inside = out.resolve() in found.resolve().parents
        if train.overwrite and inside:
            raise RunDirError(f"train.overwrite: replacing '{out}' would delete train.resume_from '{found}'")
        if holds_files(out) and not inside and not train.overwrite:
            raise RunDirError(f"train.output_dir: '{out}' already holds files, and train.resume_from '{found}' "
                              f"belongs to another run; pick an empty train.output_dir or set train.overwrite=true")
        if train.overwrite:
            _check_replaceable(out)
        return found
    if train.resume and not train.overwrite and out.is_dir():
        found = ckpt.latest_checkpoint(out)
        if found is not None:
            return found
    if holds_files(out):
        if not train.overwrite:
            what = "a run" if looks_like_run(out) else "files"
            hint = (" (it has no checkpoint to resume)" if train.resume and looks_like_run(out) else
                    " (train.resume=false starts a new run)" if looks_like_run(out) else "")
            raise RunDirError(f"train.output_dir: '{out}' already holds {what}{hint}; a new run would mix with "
                              f"it. Pick another train.output_dir or set train.overwrite=true to replace it")
        _check_replaceable(out)
    return None


def _check_replaceable(out: Path) -> None:
    if holds_files(out) and not looks_like_run(out):
        raise RunDirError(f"train.overwrite: '{out}' is not a refine-ray run directory (none of "
                          f"{', '.join(RUN_MARKERS)}); refusing to delete it")


class RunDirLock:
    """An exclusive lock on a run directory for the life of this object (``release`` ends it)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirError(f"train.output_dir: '{self.out}' is in use by another run ({holder}); wait for "
                                  f"it to finish or pick another train.output_dir") from None
            # The file may have been replaced between open and flock: then lock the new one.
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):    # only our own file: the dir may have been moved aside
                if os.stat(self.out / LOCK).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.out / LOCK)
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


@contextlib.contextmanager
def claim(train) -> Iterator[Optional[Path]]:
    """Lock ``train.output_dir`` for this run and yield the checkpoint to resume from (or None).

    The plan is made again under the lock (another run may have finished in between); with
    ``train.overwrite=true`` a previous run is renamed aside atomically and then deleted.
    """
    out = Path(train.output_dir)
    lock = RunDirLock(out)
    try:
        resume_from = plan_start(train)
        if resume_from is None and holds_files(out):        # overwrite (plan_start refused otherwise)
            lock = _replace(out, lock)
        yield resume_from
    finally:
        lock.release()


def _replace(out: Path, lock: RunDirLock) -> RunDirLock:
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(out, aside)                # atomic: the old run is whole, either here or there
    new_lock = RunDirLock(out)            # a run that slipped in between makes this raise
    lock.release()
    shutil.rmtree(aside, ignore_errors=True)
    log.warning("train.overwrite: replaced the previous run in %s", out)
    print(f"refine-ray: train.overwrite=true: removed the previous run in {out}")
    return new_lock

"""A run directory belongs to one run: who may start, resume or replace it, and an exclusive lock.

Rules (checked read-only by :func:`plan_start` in preflight, then again under the lock):

* ``train.resume_from=<checkpoint>``: resume from it (a run dir, ``step_N`` or ``step_N/learner``);
  the output directory must be empty or the run that checkpoint belongs to.
* ``train.resume=true`` (default) with a checkpoint in ``checkpoints/latest``: resume from it.
* otherwise the run starts fresh, which needs an empty (or absent) output directory; a directory
  holding a run is replaced only with ``train.overwrite=true`` (moved aside atomically, then
  deleted, and said so), and a non-empty directory that is not a refine-ray run (or that holds
  the working directory) is never replaced. One exception keeps "run the same command again"
  true: a run of this very config that stopped before its first checkpoint starts over.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from refine_ray.transport import checkpoint as ckpt
from refine_ray.system.run_log import RUN_LOG
from refine_ray.system.trackers import STATE_FILE as TRACKERS_STATE

log = logging.getLogger("refine_ray")

LOCK = ".lock"
RUN_MARKERS = ("config.json", "checkpoints", "metrics.jsonl", "tensorboard")
CONFIG_HISTORY = "config_history.jsonl"   # settings changed at a resume: what ran before
RUN_FILES = (*RUN_MARKERS, "summary.png", RUN_LOG, TRACKERS_STATE, LOCK, CONFIG_HISTORY)   # everything train itself writes there


class RunDirError(ValueError):
    """The output directory cannot be used as asked; the message is one line naming the key."""


def holds_files(out: Path) -> bool:
    """Whether ``out`` is a directory holding anything besides the run lock."""
    return out.is_dir() and any(p.name != LOCK for p in out.iterdir())


def looks_like_run(out: Path) -> bool:
    """Whether ``out`` holds any file ``train`` writes (``RUN_MARKERS``)."""
    return any((out / m).exists() for m in RUN_MARKERS)


@dataclass
class Plan:
    """How ``train`` starts in a run directory (see :func:`plan_start`)."""

    resume_from: Optional[Path]     # the checkpoint to resume from, or None for a fresh start
    replace: bool                   # move what the directory holds aside first


def plan_start(cfg, holding_lock: bool = False) -> Plan:
    """What a run with this ``ExperimentConfig`` does with its ``train.output_dir`` (read-only);
    ``holding_lock``: called by the run that holds the directory's lock.

    Raises:
        RunDirError: a fresh start into a directory holding files without ``train.overwrite``, an
            overwrite of something that is not a run (or of the working directory), a directory
            another run holds, or ``resume_from`` that conflicts with the directory.
        checkpoint.CheckpointError: ``latest`` or ``resume_from`` names no checkpoint.
    """
    train = cfg.train
    out = Path(train.output_dir)
    if not holding_lock:
        check_not_locked(out)
    if train.overwrite and holds_files(out):
        _check_replaceable(out)
    if train.resume_from:
        found = ckpt.find_checkpoint(train.resume_from)
        inside = out.resolve() in found.resolve().parents
        if train.overwrite and inside:
            raise RunDirError(f"train.overwrite: replacing '{out}' would delete train.resume_from '{found}'")
        if holds_files(out) and not inside and not train.overwrite:
            raise RunDirError(f"train.output_dir: '{out}' already holds files, and train.resume_from '{found}' "
                              f"belongs to another run; pick an empty train.output_dir or set train.overwrite=true")
        return Plan(found, train.overwrite and holds_files(out))
    if train.resume and not train.overwrite and out.is_dir():
        found = ckpt.latest_checkpoint(out)
        if found is not None:
            return Plan(found, False)
    if not holds_files(out):
        return Plan(None, False)
    if train.overwrite or (train.resume and _same_run_before_first_checkpoint(out, cfg)):
        return Plan(None, True)
    what = "a run" if looks_like_run(out) else "files"
    hint = " (train.resume=false starts a new run)" if looks_like_run(out) and not train.resume else ""
    raise RunDirError(f"train.output_dir: '{out}' already holds {what}{hint}; a new run would mix with "
                      f"it. Pick another train.output_dir or set train.overwrite=true to replace it")


def _same_run_before_first_checkpoint(out: Path, cfg) -> bool:
    """This very config stopped before its first checkpoint: running it again starts it over."""
    from refine_ray.config import to_dict

    if ckpt.completed_checkpoints(out) or any(p.name not in RUN_FILES for p in out.iterdir()):
        return False
    try:
        return json.loads((out / "config.json").read_text()) == json.loads(json.dumps(to_dict(cfg)))
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def write_config(out: Path, config: dict, resumed_at: Optional[int]) -> list[str]:
    """Write the run's ``config.json`` (atomically). On a resume whose settings differ from the
    ``config.json`` being replaced, append ``{"step": resumed_at, "changed": {key: [old, new]}}``
    to ``config_history.jsonl`` first, so the run keeps a record of what ran before the change.
    Returns the changes as ``key: old -> new`` strings (empty when none or not resuming)."""
    changes: list[str] = []
    if resumed_at is not None:
        try:
            old = json.loads((out / "config.json").read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            old = None
        diff = _changed(old, json.loads(json.dumps(config))) if isinstance(old, dict) else {}
        if diff:
            with open(out / CONFIG_HISTORY, "a") as f:
                f.write(json.dumps({"step": resumed_at, "changed": diff}) + "\n")
            changes = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()]
    partial = out / "config.json.partial"
    partial.write_text(json.dumps(config, indent=2))
    partial.replace(out / "config.json")
    return changes


def _changed(old: dict, new: dict, prefix: str = "") -> dict[str, list]:
    """Dotted keys whose values differ between two nested config dicts, ``{key: [old, new]}``."""
    out: dict[str, list] = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_changed(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = [a, b]
    return out


def check_not_locked(out: Path) -> None:
    """Raise RunDirError if a live run holds ``out``'s lock (the lock file is left as it was)."""
    try:
        fd = os.open(out / LOCK, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise _in_use(out, fd) from None
    finally:
        os.close(fd)


def _check_replaceable(out: Path) -> None:
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise RunDirError(f"train.overwrite: '{out}' is the working directory or holds it; refusing to replace it")
    if holds_files(out) and not looks_like_run(out):
        raise RunDirError(f"train.overwrite: '{out}' is not a refine-ray run directory (none of "
                          f"{', '.join(RUN_MARKERS)}); refusing to delete it")


class RunDirLock:
    """An exclusive lock on a run directory for the life of this object (``release`` ends it)."""

    def __init__(self, out: Path):
        """Create ``out`` if needed and lock ``out/<LOCK>`` (flock, non-blocking), recording pid,
        host and start time in it. Raises RunDirError naming the holder when another run has it."""
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                error = _in_use(self.out, fd)
                os.close(fd)
                raise error from None
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
        """Remove the lock file (if it is still ours) and unlock; idempotent."""
        if self.fd is not None:
            with contextlib.suppress(OSError):    # only our own file: the dir may have been moved aside
                if os.stat(self.out / LOCK).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.out / LOCK)
            os.close(self.fd)
            self.fd = None


def _in_use(out: Path, fd: int) -> RunDirError:
    """The error for a lock another run holds, naming the holder recorded in the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        holder = f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, OSError):
        holder = "holder unknown"
    return RunDirError(f"train.output_dir: '{out}' is in use by another run ({holder}); wait for it to "
                       f"finish or pick another train.output_dir")


@contextlib.contextmanager
def claim(cfg) -> Iterator[Optional[Path]]:
    """Lock ``train.output_dir`` for this run and yield the checkpoint to resume from (or None).

    The plan is made again under the lock (another run may have finished in between); a
    directory to be replaced is renamed aside atomically and then deleted, and said so.
    """
    out = Path(cfg.train.output_dir).resolve()
    lock = RunDirLock(out)
    try:
        plan = plan_start(cfg, holding_lock=True)
        if plan.replace:
            lock = _replace(out, lock)
        yield plan.resume_from
    finally:
        lock.release()


def _replace(out: Path, lock: RunDirLock) -> RunDirLock:
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES)
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(out, aside)                # atomic: the old run is whole, either here or there
    new_lock = RunDirLock(out)            # a run that slipped in between makes this raise
    lock.release()
    shutil.rmtree(aside, ignore_errors=True)
    extra = f" (including {', '.join(foreign)}, which train did not write)" if foreign else ""
    log.warning("train.overwrite: replaced the previous run in %s%s", out, extra)
    print(f"refine-ray: removed the previous run in {out}{extra}")
    return new_lock

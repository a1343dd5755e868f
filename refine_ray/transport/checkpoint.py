"""Atomic, verified, pickle-free checkpoints of a whole run.

Layout under ``<output_dir>/checkpoints/``::

    step_000012/            one complete checkpoint
        learner/            DeepSpeed save_dir: ``latest`` + tag folder ``ds/`` (every rank writes its shards)
        trainer.json        step, weight version, data cursor, failures, the run's config (controller state)
        pending.safetensors arrays of the pending async experience (when there is one)
        manifest.json       sha256 and size of every other file, written last
    latest                  text file naming the newest complete checkpoint

A checkpoint is written into ``step_N.tmp-<random>`` and renamed into place only once complete
(manifest included); ``latest`` is replaced atomically afterwards. ``latest`` names a complete
checkpoint at every instant of a save (:func:`commit_operations`), so a crash anywhere leaves
a loadable run. Re-saving a step that exists (a run resumed from an earlier checkpoint of its
own directory) first points ``latest`` at the new folder under its temporary name, with the
final name on a second line: ``latest`` lists folders and the first that exists is the
checkpoint. The old folder is then moved aside (``step_N.replaced-<pid>``), the new one renamed
into place, ``latest`` rewritten to its one line and the old folder deleted. Stale ``*.tmp-*``
and ``*.replaced-*`` folders are removed at the next save (never one ``latest`` names).
Pruning (``train.keep_checkpoints``; None keeps every checkpoint) never removes the checkpoint
``latest`` names, nor checkpoints of later steps (an abandoned branch after ``train.resume_from``).

Trust: nothing here is unpickled. The trainer state is JSON plus safetensors; DeepSpeed's own
``.pt`` files are read only under :func:`weights_only_loading`, which forces ``torch.load``'s
weights-only unpickler (tensors, containers, and an allow-list of DeepSpeed's plain classes).
The manifest detects corruption (flipped or truncated bytes), not tampering: it is written by
whoever writes the checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"
PENDING_ARRAYS = "pending.safetensors"
STEP_DIR = re.compile(r"step_(\d+)$")                     # a committed checkpoint
POINTER_NAME = re.compile(r"step_(\d+)(?:\.tmp-\w+)?$")    # what ``latest`` may name (see the module doc)


class CheckpointError(ValueError):
    """A missing, incomplete or corrupted checkpoint; the message is one line naming the file."""


def checkpoint_root(output_dir: str | Path) -> Path:
    """``<output_dir>/checkpoints``: where a run's step folders and ``latest`` live."""
    return Path(output_dir) / "checkpoints"


def step_of(path: Path) -> int:
    """The step N of a ``step_N`` folder (or of ``step_N.tmp-<random>``, a re-save in progress); -1 for
    any other name."""
    m = POINTER_NAME.match(path.name)
    return int(m.group(1)) if m else -1


def completed_checkpoints(output_dir: str | Path) -> list[Path]:
    """Committed ``step_N`` folders of a run, oldest step first."""
    root = checkpoint_root(output_dir)
    return sorted((p for p in root.glob("step_*") if p.is_dir() and STEP_DIR.match(p.name)), key=step_of) \
        if root.is_dir() else []


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The checkpoint ``checkpoints/latest`` names (the first of its lines that exists: two only
    while a step is re-saved), or None; raises CheckpointError if it names none."""
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    names = pointer.read_text().split()
    for name in names:
        if not POINTER_NAME.match(name):
            break
        if (root / name).is_dir():
            return root / name
    raise CheckpointError(f"checkpoint pointer '{pointer}' names {' or '.join(map(repr, names)) or 'nothing'}, "
                          f"which is not a checkpoint directory in '{root}' (expected step_N)")


def find_checkpoint(path: str | Path) -> Path:
    """The ``step_N`` folder meant by a run dir, its ``checkpoints/`` dir or ``checkpoints/latest``,
    a step dir, its ``learner/`` or the DeepSpeed tag folder ``learner/ds``.

    Raises:
        CheckpointError: ``path`` is none of these, or the run has no checkpoint yet.
    """
    p = Path(path)
    if p.name == LATEST and p.is_file() and p.parent.name == "checkpoints":    # the pointer file itself
        p = p.parent
    if (p / "checkpoints").is_dir() or (p.name == "checkpoints" and (p / LATEST).is_file()):
        run = p if (p / "checkpoints").is_dir() else p.parent
        found = latest_checkpoint(run)
        if found is None:
            raise CheckpointError(f"'{path}': the run has no checkpoint yet (no '{checkpoint_root(run) / LATEST}')")
        return found
    for candidate in (p, p.parent, p.parent.parent):      # step_N, step_N/learner, step_N/learner/ds
        if STEP_DIR.match(candidate.name) and ((candidate / TRAINER_STATE).is_file()
                                               or (candidate / MANIFEST).is_file()):
            return candidate
    raise CheckpointError(f"'{path}' is not a refine-ray checkpoint (expected a run directory, its "
                          f"checkpoints/ folder, a checkpoints/step_N folder or step_N/learner)")


# ------------------------------------------------------------------ writing
def begin_save(output_dir: str | Path, step: int) -> tuple[Path, Path]:
    """(temporary folder to write into, final folder) for step ``step``; removes the folders an
    interrupted save left, except one ``latest`` names."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        keep = latest_checkpoint(output_dir)
    except CheckpointError:
        keep = None
    for stale in [*root.glob("*.tmp-*"), *root.glob("*.replaced-*")]:
        if stale != keep:
            shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"{final.name}.tmp-{uuid.uuid4().hex[:12]}"     # unique even where pids repeat (containers)
    tmp.mkdir()
    return tmp, final


def commit_save(tmp: Path, final: Path, trainer_state: dict, pending_arrays: Optional[dict] = None,
                keep: Optional[int] = 2) -> Path:
    """Write the trainer state and the manifest, move the folder into place, then point ``latest`` at it
    (:func:`commit_operations`, in order). ``keep``: checkpoints kept by pruning (None: all).

    ``trainer_state`` must be JSON-serialisable; ``pending_arrays`` maps names to numpy arrays.
    """
    for _, operation in commit_operations(tmp, final, trainer_state, pending_arrays, keep):
        operation()
    return final


def commit_operations(tmp: Path, final: Path, trainer_state: dict, pending_arrays: Optional[dict] = None,
                      keep: Optional[int] = 2) -> list[tuple[str, Callable[[], None]]]:
    """The filesystem operations that commit the checkpoint written into ``tmp`` as ``final``, as
    ``(what, operation)`` in order. Before and after each one, ``latest`` names a complete,
    verifiable checkpoint (the previous one, then this one), also when ``final`` already exists;
    a crash between any two loses at most this save. (A list, so a test can stop between them.)"""
    root = final.parent
    ops = [("write the trainer state", lambda: _write_atomic(tmp / TRAINER_STATE,
                                                            json.dumps(trainer_state, indent=1).encode()))]
    if pending_arrays:
        from safetensors.numpy import save_file

        ops.append(("write the pending experience", lambda: save_file(pending_arrays, str(tmp / PENDING_ARRAYS))))
    ops.append(("write the manifest", lambda: _write_manifest(tmp)))
    if final.exists():                # re-saving a step: the old folder stays loadable until the new one is
        aside = root / f"{final.name}.replaced-{os.getpid()}"
        ops += [("point latest at the new folder", lambda: _write_atomic(root / LATEST,
                                                                           f"{tmp.name}\n{final.name}".encode())),
                ("move the old folder aside", lambda: os.replace(final, aside)),
                ("move the new folder into place", lambda: os.replace(tmp, final)),
                ("point latest at its final name", lambda: _write_atomic(root / LATEST, final.name.encode())),
                ("delete the old folder", lambda: shutil.rmtree(aside))]
    else:
        ops += [("move the new folder into place", lambda: os.replace(tmp, final)),
                ("point latest at it", lambda: _write_atomic(root / LATEST, final.name.encode()))]
    ops.append(("prune old checkpoints", lambda: _prune(root.parent, final, keep)))
    return ops


def _write_manifest(folder: Path) -> None:
    """``manifest.json``: size and sha256 of every other file in ``folder``, written last."""
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    manifest = {"format": 1, "files": {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
                                       for f in files}}
    _write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    part = path.with_name(f"{path.name}.partial-{os.getpid()}")
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _prune(output_dir: Path, current: Path, keep: Optional[int]) -> None:
    """Keep ``current`` and the ``keep - 1`` newest earlier checkpoints (None: keep all); later steps
    are left alone. Raises ValueError for ``keep < 1`` (``train.keep_checkpoints`` refuses it first)."""
    if keep is None:
        return
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be >= 1 or None (keep all), got {keep}")
    earlier = [p for p in completed_checkpoints(output_dir) if step_of(p) < step_of(current)]
    for old in earlier[:max(len(earlier) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ reading
def verify_checkpoint(path: Path, way_out: str = "resume from it with train.resume_from={}") -> None:
    """Check every file of a checkpoint against its manifest (sizes first, then sha256).

    Raises:
        CheckpointError: no manifest, a file missing, truncated or changed; the message names the
            file and the previous checkpoint with ``way_out`` (formatted with its path).
    """
    path = Path(path)
    manifest_file = path / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in files.values())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' has no {MANIFEST} (incomplete, or not written by this "
                              f"version of refine-ray){_fallback(path, way_out)}") from None
    except (OSError, ValueError, KeyError, AssertionError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint '{path}': {MANIFEST} is unreadable{_fallback(path, way_out)}") from None
    for rel, entry in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint '{path}': file '{rel}' is missing{_fallback(path, way_out)}")
        if f.stat().st_size != entry.get("bytes"):
            raise CheckpointError(f"checkpoint '{path}': file '{rel}' has {f.stat().st_size} bytes, the manifest "
                                  f"says {entry.get('bytes')} (truncated or replaced){_fallback(path, way_out)}")
    for rel, entry in files.items():
        if _sha256(path / rel) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint '{path}': file '{rel}' does not match its sha256 in {MANIFEST} "
                                  f"(corrupted or modified){_fallback(path, way_out)}")
    check_pickled_globals(path)


def check_pickled_globals(path: Path) -> None:
    """Refuse ``.pt`` files that pickle anything beyond tensors, containers and
    ``DEEPSPEED_SAFE_GLOBALS``; read with torch's scanner, which executes nothing.

    Raises:
        CheckpointError: naming the file and the first offending global.
    """
    for f in sorted(Path(path).rglob("*.pt")):
        try:
            unsafe = unsafe_globals(f, allowed=DEEPSPEED_SAFE_GLOBALS)
        except Exception as e:      # not a torch zip file: the manifest passed, so it was written so
            raise CheckpointError(f"checkpoint '{path}': '{f.relative_to(path)}' is not a torch checkpoint "
                                  f"file ({type(e).__name__})") from None
        if unsafe:
            raise CheckpointError(f"checkpoint '{path}': '{f.relative_to(path)}' pickles {unsafe[0]!r}, which "
                                  f"refine-ray does not load (only tensors and DeepSpeed's plain classes); "
                                  f"refusing a checkpoint that could run code")


def unsafe_globals(file: Path, allowed: tuple = ()) -> list[str]:
    """Globals a torch pickle file would rebuild beyond tensors, containers and ``allowed``, listed
    by torch's scanner (``get_unsafe_globals_in_checkpoint``), which executes nothing.
    Raises whatever torch raises for a file that is not a torch checkpoint."""
    import torch

    return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(file)) if g not in allowed]


def _fallback(path: Path, way_out: str) -> str:
    earlier = [p for p in completed_checkpoints(path.parent.parent) if step_of(p) < step_of(path)]
    if earlier:
        return f"; the previous checkpoint is {earlier[-1]}: {way_out.format(earlier[-1])}"
    return "; no earlier checkpoint exists"


def load_trainer_state(path: Path) -> dict:
    """The trainer state of a verified checkpoint, with ``pending`` arrays loaded (``pending_arrays``)."""
    try:
        state = json.loads((Path(path) / TRAINER_STATE).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} is unreadable ({e})") from None
    missing = [k for k in ("step", "version", "cursor", "failures", "pending") if not isinstance(state, dict)
               or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} lacks {', '.join(missing)} "
                              f"(not written by refine-ray)")
    cursor = state["cursor"]
    wrong = [k for k in ("step", "version", "failures") if not _count(state[k])]
    if not isinstance(cursor, dict) or not all(_count(cursor.get(k)) for k in ("epoch", "position", "skipped")):
        wrong.append("cursor")
    if wrong:
        raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} has malformed {', '.join(wrong)} "
                              f"(expected counts >= 0; not written by refine-ray)")
    state["pending_arrays"] = {}
    if (Path(path) / PENDING_ARRAYS).is_file():
        from safetensors.numpy import load_file

        state["pending_arrays"] = load_file(str(Path(path) / PENDING_ARRAYS))
    return state


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# DeepSpeed's checkpoint files pickle a few plain classes beside tensors (seen in 0.19.8's ZeRO
# 0-3 files); these, and only these, are allowed to be rebuilt by the weights-only unpickler.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Make every ``torch.load`` in this block weights-only, even DeepSpeed's ``weights_only=False`` calls.

    A checkpoint directory from someone else then cannot run code on resume or export: a
    pickled object outside tensors/containers/``DEEPSPEED_SAFE_GLOBALS`` fails to load with
    ``pickle.UnpicklingError`` naming the global. Process-wide (environment variable
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``): use it in single-threaded code such as a learner actor's load.
    """
    import importlib

    import torch

    classes = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            classes.append(getattr(importlib.import_module(module), attr))
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(classes):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


# ------------------------------------------------------------------ pending experience without pickle
def encode_batches(obj, key: str, arrays: dict, batch_types: tuple = ()):
    """A JSON tree for ``obj`` (dataclasses of ``batch_types``, lists, tuples, dicts, numbers, numpy
    arrays); arrays go into ``arrays`` under dotted names. Raises TypeError for anything else.

    The caller names the dataclasses it stores (the controller: transport batches and its shard
    results), so this module needs no import from the layers above it."""
    import dataclasses

    import numpy as np

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        arrays[key] = np.ascontiguousarray(obj)
        return {"array": key}
    if dataclasses.is_dataclass(obj) and type(obj) in batch_types:
        return {"batch": type(obj).__name__,
                "fields": {f.name: encode_batches(getattr(obj, f.name), f"{key}.{f.name}", arrays, batch_types)
                           for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {"dict": {str(k): encode_batches(v, f"{key}.{k}", arrays, batch_types) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return {"tuple" if isinstance(obj, tuple) else "list":
                [encode_batches(v, f"{key}.{i}", arrays, batch_types) for i, v in enumerate(obj)]}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {key}")


def decode_batches(tree, arrays: dict, batch_types: tuple = ()):
    """Inverse of :func:`encode_batches`; only the dataclasses named in ``batch_types`` are rebuilt
    (any other name is refused: a checkpoint never chooses what code runs). Raises CheckpointError."""
    if not isinstance(tree, dict):
        return tree
    if "array" in tree:
        return arrays[tree["array"]]
    if "batch" in tree:
        known = {c.__name__: c for c in batch_types}
        if tree["batch"] not in known:
            raise CheckpointError(f"pending experience names an unknown batch type {tree['batch']!r}")
        return known[tree["batch"]](**{k: decode_batches(v, arrays, batch_types) for k, v in tree["fields"].items()})
    if "dict" in tree:
        return {k: decode_batches(v, arrays, batch_types) for k, v in tree["dict"].items()}
    if "tuple" in tree:
        return tuple(decode_batches(v, arrays, batch_types) for v in tree["tuple"])
    return [decode_batches(v, arrays, batch_types) for v in tree["list"]]

"""A run's log file (``<train.output_dir>/run.log``) and a quiet console.

The console shows what a user acts on: the phase lines (seconds since the command started),
the progress bar, warnings of our own and of libraries that are not known to be harmless, and
the final line. ``run.log`` keeps everything: the driver's log records and warnings, and every
line every actor writes to stdout/stderr (each with its time and pid), the known third-party
noise included (:data:`NOISE`: fla's "Triton is not supported" on every CPU process, DeepSpeed's
accelerator and comm-op lines, a torch FutureWarning that DeepSpeed's ZeRO triggers, Ray's
start-up lines).

Actors get this through Ray's ``worker_process_setup_hook`` (:func:`worker_runtime_env`), which
runs when a worker process starts, before it imports a role (fla warns on import): the hook
(:func:`setup_worker`) replaces ``sys.stdout``/``sys.stderr`` by line filters that write every
line to ``run.log`` and pass the others on to Ray, which forwards them to the driver's console.
Writes are whole lines appended with ``O_APPEND``, so the processes of one run share the file.
Lines that C code writes to the file descriptors directly bypass the filters (Ray still forwards
them). The driver side (:func:`attach_driver`) filters Python warnings and Ray's log records.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, TextIO

RUN_LOG = "run.log"
ENV = "REFINE_RUN_LOG"          # the run log's path, in every worker's environment

# Known third-party lines that ask nothing of the user (each: what prints it). Kept in run.log.
# A warning is matched as a whole (message and the source line Python prints under it).
NOISE = re.compile("|".join((
    r"Triton is not supported on current platform",          # fla, on import, on every CPU process
    r"Setting accelerator to CPU",                            # DeepSpeed's accelerator detection
    r"deepspeed_shm_comm_op built successfully",              # DeepSpeed's CPU comm op, loaded every run
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",   # torch, by ZeRO
    r"Token authentication is enabled for this Ray cluster",  # Ray start-up (auth stays on)
    r"Generated new authentication token",
    r"Started a local Ray instance",
)))


def is_noise(line: str) -> bool:
    """Whether ``line`` is one of the known third-party lines (:data:`NOISE`)."""
    return NOISE.search(line) is not None


class _Sink:
    """Appends whole, time-stamped lines to the run log; until a file is open (the driver before its
    run directory exists) it keeps them. Never raises: a full disk must not stop a run."""

    def __init__(self, who: str, path: Optional[Path] = None):
        self.who, self.file, self.kept = who, None, []
        if path is not None:
            self.open(path)

    def open(self, path: Path) -> None:
        """Write to ``path`` from now on (appending), the kept lines first; raises OSError."""
        if self.file is not None:
            self.file.close()
        self.file = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
        kept, self.kept = self.kept, []
        self._write("".join(kept))

    def line(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        lines = "".join(f"{stamp} ({self.who}) {t}\n" for t in text.rstrip("\n").split("\n"))
        if self.file is None:
            self.kept.append(lines)
        else:
            self._write(lines)

    def _write(self, lines: str) -> None:
        try:
            self.file.write(lines)
        except (OSError, ValueError):
            pass


class _LineFilter:
    """A text stream that writes every line to the run log and only the non-noise ones on to ``stream``."""

    def __init__(self, stream: TextIO, sink: _Sink):
        self.stream, self.sink, self.pending = stream, sink, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith(":actor_name:"):     # Ray's marker for its log monitor: name the lines after it
                self.sink.who = f"{line[len(':actor_name:'):]} pid={os.getpid()}"
            elif not line.startswith((":job_id:", ":task_name:")):
                self.sink.line(line)
            if not is_noise(line):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):            # fileno, isatty, encoding, ... of the real stream
        return getattr(self.stream, name)


def _route_warnings(sink: _Sink) -> None:
    """Python warnings: the known noise to the run log only, the rest to the log and the console."""
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line)
        if is_noise(text):
            sink.line(text)
        else:
            if not isinstance(sys.stderr, _LineFilter):       # the driver: the filter logs it in workers
                sink.line(text)
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook``: route this worker's output through the run log (``$REFINE_RUN_LOG``).

    Leaves the process as it is when the variable is unset or the file cannot be opened."""
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        sink = _Sink(f"pid={os.getpid()}", Path(path))
    except OSError:
        return
    sys.stdout, sys.stderr = _LineFilter(sys.stdout, sink), _LineFilter(sys.stderr, sink)
    _route_warnings(sink)


def worker_runtime_env(out_dir: str | Path) -> dict:
    """The ``runtime_env`` that gives every worker of the job :func:`setup_worker` and the run log's path."""
    return {"worker_process_setup_hook": f"{__name__}.setup_worker",
            "env_vars": {ENV: str(Path(out_dir).resolve() / RUN_LOG)}}


class _ToRunLog(logging.Handler):
    def __init__(self, sink: _Sink):
        super().__init__(logging.INFO)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.line(f"{record.levelname} {record.name}: {record.getMessage()}")


class _NoiseToRunLog(logging.Filter):
    """On a console handler: known noise goes to the run log instead."""

    def __init__(self, sink: _Sink):
        super().__init__()
        self.sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        if is_noise(record.getMessage()):
            self.sink.line(f"{record.levelname} {record.name}: {record.getMessage()}")
            return False
        return True


class PhaseConsole(logging.Handler):
    """``refine_ray``'s log records on the console as ``[  3.1s] message``, in seconds since this
    process started (a ``bash scripts/train.sh`` that execs it included), written with
    ``tqdm.write`` so that a progress bar stays whole."""

    def __init__(self):
        import psutil

        super().__init__(logging.INFO)
        self.t0 = psutil.Process().create_time()

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(f"[{max(record.created - self.t0, 0.0):5.1f}s] {record.getMessage()}", file=sys.stderr)


_driver: Optional[_Sink] = None


def _driver_sink() -> _Sink:
    """The driver's sink, created once per process: ``refine_ray``'s records and Python warnings go to it."""
    global _driver
    if _driver is None:
        _driver = _Sink("driver")
        logging.getLogger("refine_ray").addHandler(_ToRunLog(_driver))
        _route_warnings(_driver)
    return _driver


def show_phases() -> None:
    """The command line's set-up: ``refine_ray``'s INFO and higher records on the console as phase
    lines, and they, the warnings and Ray's records kept for the run log from now on."""
    logger = logging.getLogger("refine_ray")
    if not any(isinstance(h, PhaseConsole) for h in logger.handlers):    # once per process
        logger.addHandler(PhaseConsole())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _driver_sink()


def attach_driver(out_dir: str | Path) -> None:
    """In the driver, once the run directory exists: the run log is ``<out_dir>/run.log`` from now on
    (for this process; a later run switches it), holding the lines kept before. Ray's known noise
    goes only there. Raises OSError when the file cannot be opened."""
    import ray  # noqa: F401  (its console handler is set up on import)

    sink = _driver_sink()
    sink.open(Path(out_dir) / RUN_LOG)
    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _NoiseToRunLog) for f in handler.filters):
            handler.addFilter(_NoiseToRunLog(sink))


def note(text: str) -> None:
    """Append a line the driver printed itself (the final ``done:`` or error line) to the run log."""
    if _driver is not None:
        _driver.line(text)

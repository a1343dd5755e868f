"""Experiment trackers beside ``metrics.jsonl``: TensorBoard (the default), Weights & Biases, MLflow.

    train.loggers: [tensorboard, wandb, mlflow]     # W&B: pip install 'refine-ray[wandb]'; MLflow: '[mlflow]'

Every tracker gets the same scalars (the step dict ``RefineController.step`` returns) at the same
step number: step N is the state after N training steps, as in the progress bar, ``metrics.jsonl``
and the checkpoint ``step_N``. Each also gets the run's config: TensorBoard as a text summary,
W&B as the run config, MLflow as params (dotted keys, ``model.hidden_size``).

Where they write: TensorBoard to ``<run>/tensorboard``; W&B to ``<run>/wandb`` (online, or offline
with ``WANDB_MODE=offline``: ``wandb sync <run>/wandb/offline-run-*`` uploads later), project
``train.project``, entity from ``WANDB_ENTITY``; MLflow to ``MLFLOW_TRACKING_URI`` (a server, or
``file://``/``sqlite://`` stores; unset: MLflow's default ``sqlite:///mlflow.db`` in the working
directory), experiment ``train.project``. The run's name is the config's ``name``.

Resume: the W&B run id and the MLflow run id are kept in ``<run>/trackers.json``; a resumed run
continues the same tracker runs. TensorBoard's event files are rewritten without the events past the
checkpoint (:func:`drop_events_after`), so every step is in them once and readers see no restart
(``SummaryWriter(purge_step=...)`` alone would leave the old points in the old file for readers to
purge, with a warning, or to show twice). W&B and MLflow cannot delete points, so the steps between
the last checkpoint and a crash appear twice there, the old value and the resumed one at the same
step (``metrics.jsonl`` and TensorBoard keep one). W&B plots against our ``step`` (its own
``_step`` counter would refuse to go back). MLflow params are written when its run is created
(they are immutable): a resumed run with changed settings keeps the first ones there.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional

from refine_ray.config import ConfigError

log = logging.getLogger("refine_ray")

TRACKERS = ("tensorboard", "wandb", "mlflow")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}   # module each needs
STATE_FILE = "trackers.json"


def check_trackers(names: Iterable[str]) -> None:
    """Every tracker in ``names`` (``train.loggers``) is installed; raises ConfigError, one line
    naming the extra to install, before anything starts."""
    for name in names:
        if importlib.util.find_spec(_PACKAGE[name]) is None:
            raise ConfigError(f"train.loggers: '{name}' needs the {_PACKAGE[name]} package, not installed here: "
                              f"pip install 'refine-ray[{name}]' (or remove it from train.loggers)")


def flatten(config: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config dicts as ``{'model.hidden_size': '64', ...}`` (values as JSON text, lists included)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def drop_events_after(folder: Path, step: int) -> None:
    """Rewrite each TensorBoard event file in ``folder`` without its events of steps > ``step`` (logged
    after the checkpoint a run resumes from); each file is written beside itself and renamed over it,
    files with nothing to drop are left alone. A record cut short by a crash ends its file's events.
    Raises OSError when a file cannot be read or written."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for stale in folder.glob("*.partial"):          # a rewrite cut short: TensorBoard would read it too
        stale.unlink()
    for path in sorted(folder.glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [r for r in records if Event.FromString(r).step <= step]
        if len(kept) == len(records):
            continue
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as f:
            writer = RecordWriter(f)
            for record in kept:
                writer.write(record)
        partial.replace(path)


class TensorBoardTracker:
    """Scalars in ``<run>/tensorboard``; the config as a text summary on a fresh run. A resumed run
    (``resume_step``: its checkpoint's step) first drops the events logged past that step."""

    def __init__(self, run_dir: Path, config: Optional[dict], resume_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        folder = run_dir / "tensorboard"
        if resume_step is not None and folder.is_dir():
            drop_events_after(folder, resume_step)
        self.writer = SummaryWriter(str(folder))
        if config is not None and resume_step is None:
            text = json.dumps(config, indent=2)
            self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def state(self) -> dict:
        return {}                           # nothing to resume by: the event files are cut at the checkpoint

    def close(self, finished: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``<run>/wandb``, resumed by id; every scalar is plotted against ``step``."""

    def __init__(self, run_dir: Path, name: str, project: str, config: Optional[dict], run_id: Optional[str]):
        import wandb

        try:
            self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=config, id=run_id,
                                  resume="allow" if run_id else None,
                                  settings=wandb.Settings(quiet=True, console="off"))
        except Exception as e:   # no login, a bad project: one line before the run starts
            raise ConfigError(f"train.loggers: wandb did not start ({_first_line(e)}); log in with `wandb login` "
                              f"or set WANDB_MODE=offline") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log({**metrics, "step": step})

    def state(self) -> dict:
        return {"id": self.run.id}

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class MlflowTracker:
    """An MLflow run in experiment ``project`` of the tracking store (``MLFLOW_TRACKING_URI``)."""

    def __init__(self, name: str, project: str, config: Optional[dict], run_id: Optional[str]):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        uri = self.client.tracking_uri
        try:
            if run_id is not None:
                try:
                    self.client.update_run(run_id, status="RUNNING")
                except MlflowException:
                    log.warning("mlflow: run %s is not in %s; starting a new run", run_id, uri)
                    run_id = None
            if run_id is None:
                exp = self.client.get_experiment_by_name(project)
                exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
                run_id = self.client.create_run(exp_id, run_name=name).info.run_id
                if config is not None:
                    self.client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(config).items()])
        except MlflowException as e:      # a store that cannot be opened or written: one line
            raise ConfigError(f"train.loggers: mlflow could not open a run in '{uri}' ({_first_line(e)}); "
                              f"set MLFLOW_TRACKING_URI") from None
        self.run_id = run_id

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri}

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "FAILED")


def open_trackers(names: Iterable[str], run_dir: Path, name: str, project: str, config: Optional[dict],
                  resume_step: Optional[int]) -> list:
    """Start the trackers ``names`` for the run in ``run_dir``; a resumed run (``resume_step`` not
    None) continues the W&B / MLflow runs named in ``<run_dir>/trackers.json``, a fresh one starts
    new runs and rewrites that file. Raises ConfigError (one line) when a tracker is missing or
    cannot start."""
    names = list(dict.fromkeys(names))
    check_trackers(names)
    path = run_dir / STATE_FILE
    saved: dict = {}
    if resume_step is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            log.warning("%s is unreadable; the trackers start new runs", path)
    opened = []
    try:
        for tracker in names:
            if tracker == "tensorboard":
                opened.append(("tensorboard", TensorBoardTracker(run_dir, config, resume_step)))
            elif tracker == "wandb":
                opened.append(("wandb", WandbTracker(run_dir, name, project, config, saved.get("wandb", {}).get("id"))))
            else:
                opened.append(("mlflow", MlflowTracker(name, project, config, saved.get("mlflow", {}).get("run_id"))))
    except BaseException:
        for _, t in opened:
            t.close(finished=False)
        raise
    state = {**saved, **{k: s for k, s in ((k, t.state()) for k, t in opened) if s}}   # run ids (W&B, MLflow)
    partial = path.with_name(STATE_FILE + ".partial")
    partial.write_text(json.dumps(state, indent=2))
    partial.replace(path)
    return [t for _, t in opened]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]

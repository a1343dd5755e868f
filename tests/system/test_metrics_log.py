"""Where step metrics go, read back for real: summary.png's panels, metrics.jsonl, TensorBoard event
files, a W&B offline run (its ``.wandb`` transaction log parsed with W&B's own record protobuf) and an
MLflow file store (through MlflowClient). One step numbering (step N = after N training steps); a resumed run drops what was
logged past its checkpoint (jsonl, TensorBoard) and continues the same W&B / MLflow runs.
"""
import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from refine_ray.config import ConfigError
from refine_ray.system.metrics_log import MetricsLogger, summary_figure
from refine_ray.system.trackers import check_trackers, flatten


def _row(step, value):
    return {"loss": value, "ntp_loss": value + 1, "train_cuts/reward_mean": 0.1 * step, "time/step_s": 0.5}


def _tensorboard(run: Path, key: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(key)]


def _jsonl(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_resume_drops_rows_past_the_checkpoint_in_jsonl_and_tensorboard(tmp_path):
    """Steps 1-3 logged, the checkpoint is step_2, the run crashes: the resumed run logs 3 and 4 again."""
    first = MetricsLogger(tmp_path, name="r")
    for step in (1, 2, 3):
        first.log(step, _row(step, 10.0 + step))
    first.close(finished=False)
    second = MetricsLogger(tmp_path, resume_step=2, name="r")
    for step in (3, 4):
        second.log(step, _row(step, 20.0 + step))
    second.close()
    want = [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    assert _jsonl(tmp_path) == want
    assert _tensorboard(tmp_path, "loss") == want
    assert (tmp_path / "summary.png").is_file()


def test_resume_leaves_each_step_once_in_the_event_files(tmp_path, caplog):
    """Ctrl-C after step 17, the last checkpoint step 16: the resumed run logs 17 again. Every event file
    read record by record holds each step once (no file keeps the old 17), and TensorBoard's reader
    finds nothing to purge (it warned "Detected out of order event.step ... Purging" when the old 17
    stayed in the first file behind a purge_step marker)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    first = MetricsLogger(tmp_path, name="r")
    for step in range(1, 18):
        first.log(step, _row(step, 10.0 + step))
    first.close(finished=False)
    second = MetricsLogger(tmp_path, resume_step=16, name="r")
    for step in (17, 18):
        second.log(step, _row(step, 20.0 + step))
    second.close()
    files = sorted((tmp_path / "tensorboard").iterdir())
    assert len(files) == 2 and all(f.name.startswith("events.out.tfevents.") for f in files)
    steps = [e.step for f in files for e in EventFileLoader(str(f)).Load()
             for v in e.summary.value if v.tag == "loss"]
    assert steps == list(range(1, 19))
    with caplog.at_level("WARNING", logger="tensorboard"):
        assert _tensorboard(tmp_path, "loss")[-3:] == [(16, 26.0), (17, 37.0), (18, 38.0)]
    assert not [r for r in caplog.records if "Purging" in r.getMessage()]


def test_summary_is_a_grid_of_labelled_panels_with_plain_tick_labels(tmp_path):
    """Values that draw offset notation by default (entropy 10.3134-10.3153, a PG loss of 1e-8)
    get their own written-out tick labels; every panel has a title, a unit and a step axis."""
    history = [{"step": s, "loss": 10.34 - 0.05 * s, "ntp_loss": 10.34 - 0.05 * s, "pg_loss": (-1) ** s * 2e-8 * s,
                "cut_entropy": 10.3134 + 0.0002 * s, "train_cuts/reward_mean": 0.36 + 0.004 * s, "clipfrac": 0.0,
                "grad_norm": 1.5, "time/step_s": 1.3, "tokens_per_s": 800.0, "collapse/hidden_pair_cosine": 0.05 * s,
                **({"val/ntp_loss": 10.3 - 0.03 * s, "val/nsp_exact_greedy": 0.0, "val/nsp_cosine_frozen": 0.4}
                   if s % 4 == 0 else {})} for s in range(1, 13)]
    fig = summary_figure(history, "r")
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 11 and fig.get_figwidth() / fig.get_figheight() < 2           # a grid, not a row
    for ax in panels:
        assert ax.get_title() and ax.get_ylabel() and ax.get_xlabel().startswith("step"), ax.get_title()
        assert ax.yaxis.get_offset_text().get_text() == "", ax.get_title()                # no offset, no factor
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert len(set(labels)) == len(labels) > 1, (ax.get_title(), labels)             # distinct ticks
    units = {ax.get_title(): ax.get_ylabel() for ax in panels}
    assert units["NTP loss"] == "nats / token" and units["step time"] == "seconds"
    assert "[-1, 1]" in units["reward at training cuts"] and "[0, 1]" in units["PPO clip fraction"]


def _wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file: W&B's header, then LevelDB's log format (32 KiB blocks;
    each chunk: crc32c(4) length(2, little-endian) type(1): 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:                  # block trailer: zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _wandb_run(run: Path) -> tuple[set, dict, list[dict]]:
    """(run ids, config, history rows) of every offline session of the run, oldest first."""
    ids, config, rows = set(), {}, []
    for session in sorted((run / "wandb").glob("offline-run-*")):
        (log_file,) = session.glob("*.wandb")
        for rec in _wandb_records(log_file):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.add(rec.run.run_id)
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return ids, config, rows


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """W&B offline and an MLflow file store, both under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 keeps the file store behind this switch
    return tmp_path / "run"


def test_every_tracker_gets_the_same_scalars_and_a_resume_continues_the_same_runs(tracker_env):
    from mlflow.tracking import MlflowClient

    run, loggers = tracker_env, ("tensorboard", "wandb", "mlflow")
    config = {"name": "t", "model": {"hidden_size": 64}, "data": {"path": ["a.parquet", "b.parquet"]}}
    first = MetricsLogger(run, name="t", project="refine-test", loggers=loggers, config=config)
    for step in (1, 2, 3):
        first.log(step, _row(step, 10.0 + step))
    first.close(finished=False)                                  # crashed after step 3, checkpoint at step 2
    ids = json.loads((run / "trackers.json").read_text())
    second = MetricsLogger(run, resume_step=2, name="t", project="refine-test", loggers=loggers, config=config)
    for step in (3, 4):
        second.log(step, _row(step, 20.0 + step))
    second.close()
    assert json.loads((run / "trackers.json").read_text()) == ids          # the same runs continued

    # W&B: one run id across both sessions, the run config, every scalar against our step
    wandb_ids, wandb_config, rows = _wandb_run(run)
    assert wandb_ids == {ids["wandb"]["id"]}
    assert wandb_config["model"] == {"hidden_size": 64} and wandb_config["data"]["path"] == ["a.parquet", "b.parquet"]
    logged = [(r["step"], r["loss"]) for r in rows]
    assert logged == [(1, 11.0), (2, 12.0), (3, 13.0), (3, 23.0), (4, 24.0)]   # W&B cannot delete step 3
    assert all(set(_row(1, 0)) <= set(r) for r in rows)

    # MLflow: the same run, params from the config, the same scalars at the same steps, finished
    client = MlflowClient()
    mlrun = client.get_run(ids["mlflow"]["run_id"])
    assert mlrun.info.run_name == "t" and mlrun.info.status == "FINISHED"
    assert client.get_experiment(mlrun.info.experiment_id).name == "refine-test"
    assert mlrun.data.params["model.hidden_size"] == "64"
    assert json.loads(mlrun.data.params["data.path"]) == ["a.parquet", "b.parquet"]
    for key in _row(1, 0):
        history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key))
        assert [s for s, _ in history] == [1, 2, 3, 3, 4], key
    assert sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "loss"))[-1] == (4, 24.0)

    # TensorBoard and metrics.jsonl keep step 3 once, the resumed value
    want = [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    assert _tensorboard(run, "loss") == want and _jsonl(run) == want


@pytest.mark.slow
def test_mlflow_default_store_works_with_the_extra(tmp_path, monkeypatch):
    """No MLFLOW_TRACKING_URI: MLflow's default ``sqlite:///mlflow.db`` in the working directory,
    which the [mlflow] extra's sqlalchemy + alembic serve (the database is created: ~8 s)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    logger = MetricsLogger(tmp_path / "run", loggers=["mlflow"], name="t", config={"model": {"hidden_size": 64}})
    logger.log(1, _row(1, 2.0))
    logger.close()
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.0)]
    assert client.get_run(run_id).data.params == {"model.hidden_size": "64"}


def test_a_missing_tracker_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)            # as if the package were not installed
    with pytest.raises(ConfigError, match=r"^train.loggers: 'wandb' needs the wandb package.*refine-ray\[wandb\]"):
        check_trackers(["tensorboard", "wandb"])
    check_trackers(["tensorboard", "mlflow"])


def test_flatten_gives_dotted_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x", "f": None}) == {
        "a.b": "1", "a.c.d": "[1, 2]", "e": "x", "f": "null"}


ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", str(ROOT / "configs" / "tiny_deltanet_mid.yaml"), "data.max_length=160", "refine.n_chunks=2",
        "refine.response_length=4", "learner.num_ranks=1", "learner.gpus_per_rank=0.4",
        "scorer.gpus_per_actor=0.15", "rollout.gpus_per_actor=0.15", "reward.gpus_per_actor=0.15",
        "train.val_path=../shared/data/longbench/qmsum_16384.parquet", "train.val_every=2", "train.val_docs=1",
        "train.val_cuts=2", "train.save_every=1", "train.loggers=[tensorboard,wandb,mlflow]"]


def test_one_step_numbering_everywhere(cluster, tracker_env, capsys):
    """Step N = the state after N training steps, in the progress bar, metrics.jsonl, TensorBoard,
    W&B, MLflow, the checkpoint names and the held-out cadence (a resume continues with N + 1:
    tests/system/test_run_dirs.py; the trackers' side of a resume: the tests above)."""
    from mlflow.tracking import MlflowClient

    from refine_ray.cli import main
    from refine_ray.transport import checkpoint as ckpt

    run = tracker_env
    assert main(["train", *TINY, f"train.output_dir={run}", "train.steps=2"]) == 0
    assert "2/2 [" in capsys.readouterr().err                                         # the progress bar
    assert [p.name for p in ckpt.completed_checkpoints(run)] == ["step_000001", "step_000002"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert ["val/ntp_loss" in r for r in rows] == [False, True]                       # val_every=2: after step 2
    assert [s for s, _ in _tensorboard(run, "loss")] == [1, 2]
    assert [s for s, _ in _tensorboard(run, "val/ntp_loss")] == [2]
    ids = json.loads((run / "trackers.json").read_text())
    wandb_ids, config, history = _wandb_run(run)
    assert wandb_ids == {ids["wandb"]["id"]} and config["train"]["val_every"] == 2
    assert [h["step"] for h in history] == [1, 2]
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in rows])
    assert [h.get("val/ntp_loss") for h in history] == [None, pytest.approx(rows[1]["val/ntp_loss"])]
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(ids["mlflow"]["run_id"], "val/ntp_loss")] == [2]
    assert sorted(m.step for m in client.get_metric_history(ids["mlflow"]["run_id"], "loss")) == [1, 2]
    assert client.get_run(ids["mlflow"]["run_id"]).data.params["train.val_every"] == "2"
    assert (run / "summary.png").is_file()

"""Paths in a config (issue 20 points 2-3): the path-typed fields are found from the config's types
and resolved against the directory the user runs from; ``defaults:`` includes stay relative to the
file that names them. Model fields against the checkpoint's config.json (issue 20 point 6)."""
import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from refine_ray.cli import main
from refine_ray.config import ConfigError, ExperimentConfig, from_dict, load_config, path_fields, to_dict

ROOT = Path(__file__).resolve().parents[1]
ALL_PATHS = ["model.path=m", "tokenizer.path=t", "data.path=[a.parquet, b.parquet]", "train.output_dir=o",
             "train.resume_from=r", "train.val_path=v.parquet", "reward.encoder=e"]
NOT_PATHS = {"name", "model.type", "data.text_column", "data.answer_column", "system.ray_address", "eval.backend",
             "train.project", "system.weight_sync"}


def _set_every_path(tmp_path):
    for name in ("m", "t"):
        (tmp_path / name).mkdir()
    return [f"{o.split('=')[0]}={tmp_path}/{o.split('=')[1]}" if "[" not in o else
            f"data.path=[{tmp_path}/a.parquet, {tmp_path}/b.parquet]" for o in ALL_PATHS]


def test_path_fields_lists_every_path_typed_field_from_the_types(tmp_path):
    cfg = load_config(None, _set_every_path(tmp_path))
    found = path_fields(cfg)
    assert {"data.path", "model.path", "reward.encoder", "tokenizer.path", "train.output_dir",
            "train.resume_from", "train.val_path"} <= set(found)
    assert found["data.path"] == [f"{tmp_path}/a.parquet", f"{tmp_path}/b.parquet"]
    assert list(path_fields(cfg, output=True)) == ["train.output_dir"]
    assert "train.output_dir" not in path_fields(cfg, output=False)
    # fields left None are not listed
    assert sorted(path_fields(ExperimentConfig())) == ["data.path", "train.output_dir"]


def _string_fields(cls, key=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{key}.{f.name}" if key else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _string_fields(tp, dotted)
        elif typing.get_origin(tp) is not dict and str in (tp, *typing.get_args(tp)):
            yield dotted


def test_every_string_field_is_path_typed_or_known_not_to_be_a_path():
    """A new string field holding a path must be marked, or submit_job and path resolution miss it."""
    raw: dict = {}
    for dotted in _string_fields(ExperimentConfig):       # every string field set, nothing validated
        *sections, name = dotted.split(".")
        node = raw
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = "x"
    assert set(path_fields(from_dict(ExperimentConfig, raw, ""))) == set(_string_fields(ExperimentConfig)) - NOT_PATHS


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    """In a file as on the command line; a value naming nothing there (a hub id, a typo) stays as written,
    outputs are always absolute; defaults: includes still resolve against the including file."""
    conf, work = tmp_path / "conf", tmp_path / "work"
    (conf / "base").mkdir(parents=True)
    (work / "data").mkdir(parents=True)
    for name in ("a.parquet", "b.parquet", "val.parquet"):
        (work / "data" / name).write_bytes(b"")
    (work / "tok").mkdir()
    (conf / "base" / "common.yaml").write_text("data: {max_length: 99}\n")
    (conf / "exp.yaml").write_text("defaults: [base/common.yaml]\n"
                                   "data: {path: 'data/*.parquet'}\n"
                                   "train: {output_dir: runs/exp, val_path: [data/val.parquet, hub-org/dataset]}\n")
    monkeypatch.chdir(work)
    cfg = load_config(os.path.relpath(conf / "exp.yaml", work), ["tokenizer.path=tok", "reward.encoder=org/encoder"])
    assert cfg.data.max_length == 99                                       # the include was found beside the file
    assert cfg.data.path == str(work / "data" / "*.parquet")               # a glob matching files here
    assert cfg.train.output_dir == str(work / "runs" / "exp")              # not created, still absolute
    assert cfg.train.val_path == [str(work / "data" / "val.parquet"), "hub-org/dataset"]
    assert cfg.tokenizer.path == str(work / "tok") and cfg.reward.encoder == "org/encoder"
    assert load_config(None, ["data.path=../work/data/a.parquet"]).data.path == str(work / "data" / "a.parquet")


def test_a_missing_data_file_is_one_line_before_torch_or_ray_is_imported(tmp_path):
    """File and path checks run before the heavy imports (issue 23 point 3)."""
    code = ("import sys; from refine_ray.cli import main; rc = main(['train', '--config', "
            f"{str(ROOT / 'configs' / 'tiny_deltanet_mid.yaml')!r}, 'data.path=no/such.parquet', "
            f"'train.output_dir={tmp_path / 'run'}']); "
            "print(rc, sorted(m for m in ('torch', 'ray', 'deepspeed', 'transformers', 'fla') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "[]"], proc.stdout + proc.stderr
    assert proc.stderr.strip() == "refine-ray: data.path: 'no/such.parquet' does not exist"
    assert not (tmp_path / "run").exists()


def test_train_without_config_prints_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "train.steps=2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: refine-ray train") and "--config" in err.splitlines()[-1]


def test_train_sh_runs_where_it_is_called(tmp_path):
    """scripts/train.sh does not change directory: a config in the caller's folder is found."""
    (tmp_path / "exp.yaml").write_text("data: {path: nothing-here.parquet}\n")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "train.sh"), "--config", "exp.yaml",
                           "train.output_dir=run"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "refine-ray: data.path: 'nothing-here.parquet' does not exist"


# ------------------------------------------------------------------ issue 20 point 6
@pytest.fixture(scope="module")
def deltanet_dir(tmp_path_factory):
    from refine_ray.models import registry

    d = tmp_path_factory.mktemp("ckpt") / "deltanet"
    registry.build_model("delta_net", seed=0, vocab_size=512, hidden_size=32, num_heads=4).config.save_pretrained(d)
    return d


def test_checkpoint_config_is_the_truth_for_type_and_sizes(deltanet_dir):
    """Fields the config does not set come from config.json (and are what the run records)."""
    cfg = load_config(None, [f"model.path={deltanet_dir}", "model.type=delta_net"])
    assert (cfg.model.type, cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.model.num_heads) == \
           ("delta_net", 32, 2, 4)
    assert to_dict(cfg)["model"]["hidden_size"] == 32


@pytest.mark.parametrize("override, needle", [
    ("model.type=lact", "model.type: 'lact' contradicts model.path's checkpoint"),
    ("model.hidden_size=64", "model.hidden_size: 64 contradicts model.path's checkpoint"),
    ("model.num_heads=2", "model.num_heads: 2 contradicts model.path's checkpoint"),
])
def test_a_model_field_contradicting_the_checkpoint_is_one_line_before_anything_starts(
        deltanet_dir, tmp_path, capsys, override, needle):
    code = main(["train", "--config", str(ROOT / "configs" / "tiny_deltanet_mid.yaml"), f"model.path={deltanet_dir}",
                 "model.hidden_size=32", "model.num_heads=4", override, f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert needle in err and str(deltanet_dir / "config.json") in err
    field = override.split("=")[0].split(".")[1]
    key = "model_type" if field == "type" else field           # the checkpoint's own value is named too
    assert f"{key}={json.loads((deltanet_dir / 'config.json').read_text())[key]!r}" in err
    assert not (tmp_path / "run").exists()


def test_config_json_that_cannot_be_read_is_left_to_preflight(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    assert load_config(None, [f"model.path={tmp_path / 'm'}", "model.type=lact"]).model.type == "lact"
    with pytest.raises(ConfigError, match="model.type: 'lact' contradicts"):
        (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "delta_net", "hidden_size": 64}))
        load_config(None, [f"model.path={tmp_path / 'm'}", "model.type=lact"])


def test_resume_accepts_a_checkpoint_that_stored_paths_relative(tmp_path, monkeypatch):
    """Runs written before paths were made absolute stored model.path as written: still the same model."""
    from refine_ray.preflight import PreflightError, check_output
    from refine_ray.transport import checkpoint as ckpt

    monkeypatch.chdir(tmp_path)
    for name in ("model", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"model_type": "delta_net", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2}))
    tiny = str(ROOT / "configs" / "tiny_deltanet_mid.yaml")
    cfg = load_config(tiny, ["model.path=model", "train.output_dir=run"])
    assert cfg.model.path == str(tmp_path / "model")
    stored = to_dict(cfg)
    stored["model"]["path"] = "model"                                  # as an earlier refine-ray wrote it
    tmp, final = ckpt.begin_save(cfg.train.output_dir, 1)
    (tmp / "learner").mkdir()
    (tmp / "learner" / "weights").write_bytes(b"0")
    ckpt.commit_save(tmp, final, {"step": 1, "version": 1, "cursor": {"epoch": 0, "position": 2, "skipped": 0},
                                  "failures": 0, "pending": None,
                                  "pending_step": None, "config": stored})
    assert check_output(cfg) == final
    with pytest.raises(PreflightError, match="was written with model.path="):
        check_output(load_config(tiny, ["model.path=other", "train.output_dir=run"]))

"""Hugging Face hub ids in model.path, tokenizer.path, data.path, train.val_path (issue 20 point 12).

The driver (``refine-ray train``) replaces an id by its snapshot in the HF cache before anything
starts. Offline with nothing cached: one line naming the field, the id and the download command.
A user who downloaded earlier resolves offline from the cache: a hub cache laid out as
huggingface_hub writes it (``models--org--name/refs/main``, ``snapshots/<commit>/``) is built here
from a tiny LaCT model, the offline tokenizer and a parquet corpus, and a real preflight reads it.
Online behaviour without a network: an unreachable endpoint, in a fresh interpreter.
"""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from refine_ray.cli import main
from refine_ray.config import load_config
from refine_ray.config.hub import is_hub_id

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache of this test (huggingface_hub reads the constant at call time)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _snapshot(cache: Path, kind: str, repo_id: str) -> Path:
    """``<cache>/<kind>s--org--name/snapshots/<commit>/`` with ``refs/main`` naming it, as a download leaves it."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    return snap


def test_hub_id_or_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("fla-hub/delta_net-1.3B-100B", "org/name", "my.org/model-v1.5"):
        assert is_hub_id(value), value
    for value in ("gpt2", "outputs/run/hf", "./org/name", "/abs/org", "~/org/name", "data/train.parquet",
                  "data/*.parquet", "org--a/b", "org/../x", "org/name.jsonl", "", None):
        assert not is_hub_id(value), value
    (tmp_path / "org" / "local").mkdir(parents=True)             # an existing path always wins
    assert not is_hub_id("org/local")
    cfg = load_config(None, ["tokenizer.path=org/local"], hub=True)
    assert cfg.tokenizer.path == str(tmp_path / "org" / "local")


@pytest.mark.parametrize("field,kind", [("model.path", "model"), ("tokenizer.path", "model"),
                                        ("data.path", "dataset"), ("train.val_path", "dataset")])
def test_offline_hub_id_not_cached_is_one_line(field, kind, hub_cache, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)      # as scripts/env.sh sets it
    assert main(["train", "--config", "configs/tiny_deltanet_mid.yaml", f"{field}=someorg/not-downloaded",
                 f"train.output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    get = "hf download someorg/not-downloaded" + (" --repo-type dataset" if kind == "dataset" else "")
    for needle in (f"{field}: 'someorg/not-downloaded' is not a local path", "HF_HUB_OFFLINE=1",
                   f"`{get} --cache-dir {hub_cache}`", f"`{get} --local-dir DIR` and set {field}=DIR"):
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()


def test_missing_local_path_keeps_does_not_exist(hub_cache, tmp_path, capsys):
    for override, needle in ((f"data.path={tmp_path}/nope/corpus", f"data.path: '{tmp_path}/nope/corpus' does not exist"),
                             ("tokenizer.path=nope/deeper/tok", "tokenizer.path: 'nope/deeper/tok' does not exist")):
        assert main(["train", "--config", "configs/tiny_deltanet_mid.yaml", override,
                     f"train.output_dir={tmp_path / 'out'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "hub" not in err, err


def test_downloaded_snapshots_resolve_offline_and_pass_preflight(hub_cache, tmp_path, tokenizer):
    from refine_ray.models import registry
    from refine_ray.preflight import preflight

    model_dir = _snapshot(hub_cache, "model", "tinyorg/tiny-lact")
    registry.build_model("lact", seed=0, vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir = _snapshot(hub_cache, "dataset", "tinyorg/tiny-corpus")
    (data_dir / "data").mkdir()
    docs = pd.read_parquet(ROOT.parent / "shared/data/longbench/trec_16384.parquet", columns=["prompt"]).head(6)
    docs.to_parquet(data_dir / "data" / "train-00000-of-00001.parquet")
    docs.head(2).to_parquet(data_dir / "data" / "test-00000-of-00001.parquet")
    (data_dir / "README.md").write_text("---\nlicense: mit\n---\n")

    raw = yaml.safe_load((ROOT / "configs/tiny_deltanet_mid.yaml").read_text())
    del raw["model"]                                # model.type unset: the snapshot's config.json decides
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "exp.yaml", [
        "model.path=tinyorg/tiny-lact", "tokenizer.path=tinyorg/tiny-lact", "data.path=tinyorg/tiny-corpus",
        "train.val_path=tinyorg/tiny-corpus", "train.val_docs=2", "data.max_length=160", "refine.n_chunks=2",
        f"train.output_dir={tmp_path / 'out'}"], hub=True)
    assert cfg.model.path == cfg.tokenizer.path == str(model_dir)
    assert cfg.model.type == "lact"                 # from the snapshot's config.json, as for a local path
    assert cfg.data.path == cfg.train.val_path == str(data_dir / "data" / "train-00000-of-00001.parquet")
    report = preflight(cfg)                         # what the actors will read: local files only
    assert report.rows == 6 and report.vocab_size == len(tokenizer)
    # without hub=True (submit_job: the cluster's driver resolves) the ids stay as written
    assert load_config(None, ["model.path=tinyorg/tiny-lact"]).model.path == "tinyorg/tiny-lact"


UNREACHABLE = """
import sys
from refine_ray.config import ConfigError, load_config
try:
    load_config(None, [f"{sys.argv[1]}=someorg/not-downloaded"], hub=True)
except ConfigError as e:
    print(e)
"""


def test_online_but_hub_unreachable_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path),
               HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "-c", UNREACHABLE, "model.path"], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)
    out = proc.stdout.strip()
    assert len(out.splitlines()) == 1, proc.stdout + proc.stderr
    assert "model.path: 'someorg/not-downloaded' is not a local path" in out
    assert "could not be reached" in out and f"`hf download someorg/not-downloaded --cache-dir {tmp_path}`" in out, out

"""Typed config: YAML + dotted overrides, every bad value a one-line error naming the key."""
from pathlib import Path

import pytest

from refine_ray.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(CONFIGS / "tiny_deltanet_mid.yaml", ["refine.n_chunks=3", "optim.lr=2e-5",
                                                           "system.mode=async", "model.path=null"])
    assert cfg.refine.n_chunks == 3 and cfg.optim.lr == 2e-5 and cfg.system.mode == "async"
    assert cfg.model.path is None and cfg.learner.num_ranks == 2
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("overrides, expected", [
    (["refine.n_chunk=3"], "unknown config key 'refine.n_chunk' (did you mean 'n_chunks'?)"),
    (["refine.n_chunks=three"], "refine.n_chunks: expected an integer, got 'three'"),
    (["refine.n_chunks=0"], "refine.n_chunks: 0 must be > 0"),
    (["refine.sampling=random"], "refine.sampling: 'random' is not one of"),
    (["refine.top_p=1.5"], "refine.top_p: 1.5 is not in (0, 1]"),
    (["system.mode=fast"], "system.mode: 'fast' is not one of"),
    (["learner.zero_stage=4"], "learner.zero_stage: 4 must be 0, 1, 2 or 3"),
    (["data.batch_size=3"], "data.batch_size: 3 is not divisible by learner.num_ranks=2"),
    (["refine.kl_coef=0.1"], "refine.kl_coef: > 0 needs reference.enabled=true"),
    (["model.path=/nonexistent"], "model.path: '/nonexistent' is not a directory"),
    (["refine.prefix_sharing=yes please"], "refine.prefix_sharing: expected true or false"),
    (["optim.betas=[0.9]"], "optim.betas: [0.9] must be two numbers in [0, 1)"),
    (["nokey"], "override 'nokey': expected key.path=value"),
    (["train.steps.x=1"], "'train.steps' is not a section"),
])
def test_bad_values_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny_deltanet_mid.yaml", overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listy)
    section = tmp_path / "section.yaml"
    section.write_text("refine: 3\n")
    with pytest.raises(ConfigError, match="refine: expected a mapping, got int"):
        load_config(section)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    try:
        load_config(path)
    except ConfigError as e:
        if "is not a directory" not in str(e):   # paper-scale configs name checkpoints we do not ship
            raise


@pytest.mark.parametrize("overrides, expected", [
    (["optim.lr=nan"], "optim.lr: nan is not a finite number"),
    (["optim.lr=.inf"], "optim.lr: inf is not a finite number"),
    (["refine.temperature=-inf"], "refine.temperature: -inf is not a finite number"),
    (["optim.betas=[0.9, .nan]"], "optim.betas[1]: nan is not a finite number"),
    (["system.weight_sync_timeout_s=inf"], "system.weight_sync_timeout_s: inf is not a finite number"),
    (["train.max_retries=-1"], "train.max_retries: -1 must be >= 0"),
    (["train.keep_checkpoints=-2"], "train.keep_checkpoints: -2 must be >= 0"),
    (["data.min_length=-5"], "data.min_length: -5 must be >= 0"),
    (["data.seed=-1"], "data.seed: -1 must be >= 0"),
    (["optim.warmup_steps=-3"], "optim.warmup_steps: -3 must be >= 0"),
    (["learner.cpus_per_rank=-0.5"], "learner: gpus_per_rank and cpus_per_rank must be >= 0"),
    (["data.path=[a.parquet, 3]"], "data.path: expected a string or a list of strings, got"),
])
def test_non_finite_floats_and_negative_counts_are_rejected(overrides, expected):
    """Every float field is finite, every integer field (counts, sizes, seeds) non-negative: one line naming the key."""
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny_deltanet_mid.yaml", overrides)
    assert expected in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_data_paths_accept_a_glob_or_a_list():
    cfg = load_config(CONFIGS / "tiny_deltanet_mid.yaml", ["data.path=[a.parquet, b/*.parquet]",
                                                           "train.val_path=v/*.jsonl"])
    assert cfg.data.path == ["a.parquet", "b/*.parquet"] and cfg.train.val_path == "v/*.jsonl"

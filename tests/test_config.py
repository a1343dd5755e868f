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
    (["refine.cut_strategy=random"], "refine.cut_strategy: 'random' is not one of"),
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


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("base/*.yaml")), ids=lambda p: p.name)
def test_shipped_base_configs_have_known_keys_and_types(path):
    """configs/base/ holds parts of presets (not runs by themselves): every key and value type checks."""
    from refine_ray.config import ExperimentConfig, from_dict, read_config_file

    from_dict(ExperimentConfig, read_config_file(path), "")


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


@pytest.mark.parametrize("overrides, expected", [
    (["refine.sampling=entropy"], "config key 'refine.sampling': renamed to refine.cut_strategy"),
    (["scorer.enabled=false"], "config key 'scorer.enabled': removed: the scorer role always runs"),
    (["rollout.enabled=true"], "config key 'rollout.enabled': removed: the rollout role always runs"),
    (["reward.enabled=false"], "config key 'reward.enabled': removed: the reward role always runs"),
])
def test_old_keys_say_what_became_of_them(overrides, expected):
    """Roles that cannot be switched off have no ``enabled`` (it used to crash in placement); a renamed key names its new name."""
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny_deltanet_mid.yaml", overrides)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)
    cfg = load_config(CONFIGS / "tiny_deltanet_mid.yaml", ["reference.enabled=true", "refine.cut_strategy=argmax"])
    assert cfg.reference.enabled and cfg.refine.cut_strategy == "argmax"


def test_reward_role_asks_for_no_gpu_by_default():
    """The reward role's default work (rewards on policy hidden states) is CPU work: no GPU asked for."""
    cfg = load_config()
    assert cfg.reward.gpus_per_actor == 0.0 and cfg.scorer.gpus_per_actor == 1.0
    assert not cfg.reference.enabled


def test_custom_resources_per_role():
    cfg = load_config(CONFIGS / "tiny_deltanet_mid.yaml", ["learner.resources.refine_learner=1",
                                                           "rollout.resources={refine_rollout: 0.5}"])
    assert cfg.learner.resources == {"refine_learner": 1.0} and cfg.rollout.resources == {"refine_rollout": 0.5}
    assert cfg.scorer.resources == {}
    for overrides, expected in [
            (["scorer.resources.GPU=1"], "scorer.resources: 'GPU' is not a custom resource name"),
            (["reward.resources.refine_aux=-1"], "reward.resources.refine_aux: -1 must be >= 0"),
            (["learner.resources.refine_learner=many"], "learner.resources.refine_learner: expected a number"),
            (["learner.resources=[refine_learner]"], "learner.resources: expected a mapping")]:
        with pytest.raises(ConfigError) as e:
            load_config(CONFIGS / "tiny_deltanet_mid.yaml", overrides)
        assert expected in str(e.value), str(e.value)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_merge_in_order_then_the_file_then_overrides(tmp_path):
    _write(tmp_path / "base" / "a.yaml", "refine: {n_chunks: 3, pg_coef: 0.3}\ntrain: {steps: 7}\n")
    _write(tmp_path / "base" / "b.yaml", "defaults: [a.yaml]\nrefine: {n_chunks: 5}\noptim: {lr: 0.1}\n")
    top = _write(tmp_path / "run.yaml", "defaults: [base/b.yaml]\nrefine: {pg_coef: 0.5}\noptim: {betas: [0.8, 0.9]}\n")
    cfg = load_config(top, ["train.steps=9"])
    assert cfg.refine.n_chunks == 5                      # b over a (paths relative to the including file)
    assert cfg.refine.pg_coef == 0.5                     # the file over its defaults
    assert cfg.optim.lr == 0.1 and cfg.optim.betas == [0.8, 0.9]   # mappings merge key by key
    assert cfg.train.steps == 9                          # overrides last
    two = _write(tmp_path / "two.yaml", "defaults: [base/a.yaml, base/b.yaml]\nname: two\n")
    assert load_config(two).refine.n_chunks == 5 and load_config(two).train.steps == 7


def test_defaults_errors_name_the_file(tmp_path):
    _write(tmp_path / "x.yaml", "defaults: [y.yaml]\n")
    _write(tmp_path / "y.yaml", "defaults: [x.yaml]\n")
    for name, expected in [
            ("x.yaml", "config file '{d}/x.yaml': defaults include it again ({d}/x.yaml -> {d}/y.yaml -> {d}/x.yaml)"),
            ("missing.yaml", "config file '{d}/nowhere.yaml' does not exist (in defaults of '{d}/missing.yaml')"),
            ("listy.yaml", "config file '{d}/listy.yaml': defaults: expected a list of YAML file paths, got [3]")]:
        if name == "missing.yaml":
            _write(tmp_path / name, "defaults: [nowhere.yaml]\n")
        if name == "listy.yaml":
            _write(tmp_path / name, "defaults: [3]\n")
        with pytest.raises(ConfigError) as e:
            load_config(tmp_path / name)
        assert str(e.value) == expected.format(d=tmp_path)


# The six paper presets after moving their shared lines to configs/base/: the values that define
# each run, written out (they equal the presets before the move; post-training now sets task_update;
# issue 24 point 3: the reference's batch, PPO mini-batches and token-mean micro-batches).
PAPER_ALL = {"model.dtype": "bfloat16", "refine.n_chunks": 8, "refine.response_length": 5,
             "refine.samples_per_prefix": 1, "refine.cut_strategy": "entropy", "refine.min_prefix": 20,
             "refine.temperature": 1.0, "refine.top_p": 1.0, "refine.reward_source": "policy",
             "refine.ntp_coef": 1.0, "refine.kl_coef": 0.0, "refine.clip_low": 0.2, "refine.clip_high": 0.2,
             "refine.dual_clip": 3.0, "refine.prefix_sharing": True, "refine.ntp_loss_agg_mode": "token-mean",
             "optim.lr": 1e-6, "optim.weight_decay": 0.01,
             "optim.betas": [0.9, 0.999], "optim.grad_clip": 1.0, "optim.warmup_steps": 0,
             "reference.enabled": False}
PAPER_TRAIN = {"learner.num_ranks": 8, "learner.zero_stage": 1, "learner.gpus_per_rank": 0.5,
               "learner.cpus_per_rank": 4.0, "scorer.num_actors": 8, "scorer.gpus_per_actor": 0.2,
               "scorer.cpus_per_actor": 1.0, "rollout.num_actors": 8, "rollout.gpus_per_actor": 0.2,
               "rollout.cpus_per_actor": 1.0, "rollout.backend": "fast_weight", "reward.num_actors": 1,
               "reward.gpus_per_actor": 0.1, "reward.cpus_per_actor": 1.0, "system.mode": "sync",
               "system.placement": "colocated", "system.ray_address": "auto", "train.seed": 0, "train.log_every": 1,
               "refine.pg_coef": 0.2}
PAPER_PHASE = {
    "mid": {**PAPER_TRAIN, "data.path": "data/slimpajama_16k", "data.text_column": "text", "data.answer_column": None,
            "data.max_length": 16384, "data.batch_size": 128, "data.shuffle": True, "refine.reward": "cosine",
            "refine.ppo_mini_batch_size": 32, "refine.ppo_micro_batch_size_per_gpu": 2,
            "train.steps": 500, "train.save_every": 20, "train.task_update": "none"},
    "post": {**PAPER_TRAIN, "data.text_column": "prompt", "data.answer_column": "answer", "data.max_length": 8160,
             "data.batch_size": 64, "refine.reward": "hybrid", "refine.ppo_mini_batch_size": 16,
             "refine.ppo_micro_batch_size_per_gpu": 2, "train.steps": 25, "train.save_every": 24,
             "train.task_update": "sft"},
    "ttt": {"data.path": "data/longbench", "data.text_column": "prompt", "data.max_length": 16352,
            "data.batch_size": 8, "refine.reward": "exact", "refine.pg_coef": 0.4, "refine.ppo_mini_batch_size": 4,
            "refine.ppo_micro_batch_size_per_gpu": 1, "learner.num_ranks": 4,
            "learner.gpus_per_rank": 1.0, "scorer.num_actors": 1, "system.ray_address": None, "train.steps": 4},
}
PAPER_PRESETS = {
    "paper_mid_deltanet_1.3b": ("mid", "delta_net", "checkpoints/delta_net-1.3B-100B", "checkpoints/delta_net-1.3B-100B",
                                {"train.output_dir": "outputs/paper-mid-deltanet-1.3b"}),
    "paper_mid_lact_760m": ("mid", "lact", "checkpoints/lact-760m", "checkpoints/lact-760m",
                            {"train.output_dir": "outputs/paper-mid-lact-760m"}),
    "paper_post_deltanet_1.3b": ("post", "delta_net", "outputs/paper-mid-deltanet-1.3b/export",
                                 "checkpoints/delta_net-1.3B-100B",
                                 {"train.output_dir": "outputs/paper-post-deltanet-1.3b",
                                  "data.path": "data/ruler/ruler_squadqa_delta_net_8192_1600_train.parquet"}),
    "paper_post_lact_760m": ("post", "lact", "outputs/paper-mid-lact-760m/export", "checkpoints/lact-760m",
                             {"train.output_dir": "outputs/paper-post-lact-760m",
                              "data.path": "data/ruler/ruler_squadqa_lact_8192_1600_train.parquet"}),
    "paper_ttt_deltanet_1.3b": ("ttt", "delta_net", "outputs/paper-post-deltanet-1.3b/export",
                                "checkpoints/delta_net-1.3B-100B", {"train.output_dir": "outputs/run"}),
    "paper_ttt_lact_760m": ("ttt", "lact", "outputs/paper-post-lact-760m/export", "checkpoints/lact-760m",
                            {"train.output_dir": "outputs/run"}),
}


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_paper_presets_keep_their_values_from_the_shared_base(name):
    """Each paper preset (a few lines over configs/base/) resolves to the run it described before the move."""
    from refine_ray.config import ExperimentConfig, from_dict, read_config_file, to_dict

    phase, model_type, model_path, tokenizer_path, own = PAPER_PRESETS[name]
    raw = read_config_file(CONFIGS / f"{name}.yaml")
    cfg = to_dict(from_dict(ExperimentConfig, raw, ""))    # not validated: model.path names an unshipped checkpoint
    flat = {f"{section}.{k}": v for section, fields in cfg.items() if isinstance(fields, dict)
            for k, v in fields.items()}
    expected = {**PAPER_ALL, **PAPER_PHASE[phase], **own, "model.type": model_type, "model.path": model_path,
                "tokenizer.path": tokenizer_path}
    assert cfg["name"] == name.replace("_", "-")
    assert {k: flat[k] for k in expected} == expected
    assert len((CONFIGS / f"{name}.yaml").read_text().splitlines()) <= 15     # the shared lines live in base/


def test_paper_presets_of_one_phase_differ_only_in_the_model():
    from refine_ray.config import ExperimentConfig, from_dict, read_config_file, to_dict

    for phase in ("mid", "post", "ttt"):
        a, b = (to_dict(from_dict(ExperimentConfig, read_config_file(CONFIGS / f"paper_{phase}_{m}.yaml"), ""))
                for m in ("deltanet_1.3b", "lact_760m"))
        differ = {f"{s}.{k}" for s in a if isinstance(a[s], dict) for k in a[s] if a[s][k] != b[s][k]}
        differ |= {s for s in a if not isinstance(a[s], dict) and a[s] != b[s]}
        assert differ <= {"name", "model.type", "model.path", "tokenizer.path", "data.path", "train.output_dir"}, differ


def test_package_version_matches_pyproject_and_imports_nothing_heavy():
    import re
    import subprocess
    import sys

    import refine_ray

    pyproject = (CONFIGS.parent / "pyproject.toml").read_text()
    assert refine_ray.__version__ == re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert '"rouge-score"' not in pyproject                     # nothing imports it
    code = "import sys, refine_ray; print(sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"

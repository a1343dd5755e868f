"""refine-ray: Ray-native multi-role REFINE training for fast-weight language models.

REFINE (next-sequence RL on top of next-token training) for DeltaNet, GatedDeltaNet and LaCT.
The package is layered; each folder imports only from the ones above it in this list:

  config.py, data.py  typed experiment configuration (YAML + dotted overrides); tokenizer and corpus
  algo/               REFINE as pure tensor functions: entropy, cuts, rewards, GRPO advantages, PPO/NTP losses
  models/             fla's tiers: ops (kernels and references) -> layers -> model families -> registry
  refine/             the single-process REFINE pipeline on tensors (no Ray, no DeepSpeed): scoring,
                      cut states, sampling at cuts, rewarding, the per-document loss, seeding keys
  serving/            vLLM as a rollout backend
  system/             the Ray/distributed layer: controller, actor groups, placement, transport
                      batches, weight sync, DeepSpeed learner, checkpoints, run dirs, metrics, KubeRay
  eval/               evaluation (LongBench, RULER, NIAH) and test-time training; beside system/
  cli.py, train.py, export.py, preflight.py   the entry points (``refine-ray train|eval|export``)

The Ray actors themselves live in the top-level ``roles/`` package, one file per role; only
``system/controller.py`` imports them. Importing ``refine_ray`` loads nothing heavy (no torch, no Ray).
"""

__version__ = "0.1.0"   # equal to [project].version in pyproject.toml (tests/test_config.py checks it)

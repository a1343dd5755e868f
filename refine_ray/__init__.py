"""refine-ray: Ray-native multi-role REFINE training for fast-weight language models.

REFINE (next-sequence RL on top of next-token training) for DeltaNet, GatedDeltaNet and LaCT.
The package is layered; each entry imports only from the entries above it in this list
(tests/test_layers.py checks every import):

  algo/               REFINE as pure tensor functions: entropy, cuts, rewards, GRPO advantages, PPO/NTP losses
  models/             fla's tiers: ops (kernels and references) -> layers -> model families -> registry
  config/, data.py    typed experiment configuration (YAML + dotted overrides); tokenizer and corpus
  refine/             the single-process REFINE pipeline on tensors (no Ray, no DeepSpeed): scoring,
                      cut states, sampling at cuts, rewarding, the per-document loss, seeding keys,
                      the fixed-cut held-out evaluation, collapse indicators
  system/ libraries   what the roles use: transport batches, weight sync, the DeepSpeed learner, checkpoints
  serving/            vLLM: the plugin for fla DeltaNet / GatedDeltaNet, rollout and eval engines
  roles/, eval/       the Ray actors (top-level package, one file per role); evaluation (LongBench,
                      RULER, NIAH) and test-time training
  system/ controller  the controller, experience, actor groups, placement, run dirs, metrics, KubeRay
  cli.py, train.py, export.py, preflight.py   the entry points (``refine-ray train|eval|export``)

Only ``system/controller.py`` imports ``roles/``. Importing ``refine_ray`` loads nothing heavy (no torch, no Ray).
"""

__version__ = "0.1.0"   # equal to [project].version in pyproject.toml (tests/test_config.py checks it)

"""refine-ray: Ray-native multi-role REFINE training for fast-weight language models.

REFINE (next-sequence RL on top of next-token training) for DeltaNet, GatedDeltaNet and LaCT.
The package is layered; each entry imports only from the entries above it in this list
(tests/test_layers.py checks every import):

  algo/               REFINE as pure tensor functions: entropy, cuts, rewards, GRPO advantages, PPO/NTP losses
  models/             fla's tiers: ops (kernels and references) -> layers -> model families -> registry
  config/, data/      typed experiment configuration (YAML + dotted overrides); tokenizer and corpus
  refine/             the single-process REFINE pipeline on tensors (no Ray, no DeepSpeed): scoring,
                      cut states, sampling at cuts, rewarding, the per-document loss, seeding keys,
                      the fixed-cut held-out evaluation, collapse indicators
  transport/          what roles and driver exchange: batches, weight sync (one file per backend), checkpoint files
  serving/            rollout engines (one interface: ours, vLLM) and the vLLM plugin and eval engine
  roles/, eval/       the Ray actors (top-level package, one file per role; the learner is the DeepSpeed
                      rank); evaluation (LongBench, RULER, NIAH) and test-time training
  system/             the driver: controller, experience, actor groups, placement, run dirs, metrics, memory plan
  cli.py, train.py, export.py, preflight.py, plan.py   the entry points (``refine-ray train|eval|export|plan``)

Importing ``refine_ray`` loads nothing heavy (no torch, no Ray).
"""

__version__ = "0.1.0"   # equal to [project].version in pyproject.toml (tests/test_config.py checks it)

"""A NaN reward stops the step before its advantages (issue 24 point 10).

One NaN reward made its whole GRPO group's advantages NaN and the gradients non-finite. Real
components: a local Ray cluster, every role as an actor, one DeepSpeed learner rank on gloo,
LongBench text; the experience of a real step with one reward replaced by NaN.
"""
import dataclasses

import numpy as np
import pytest

from refine_ray.config import load_config
from refine_ray.data import load_tokenizer
from refine_ray.system.controller import LearnerFailure, NonFiniteReward, RefineController


def test_a_nan_reward_is_one_line_naming_the_sample(cluster, tmp_path):
    cfg = load_config("configs/tiny_deltanet_mid.yaml", [
        "data.max_length=160", "refine.n_chunks=2", "refine.response_length=4", "learner.num_ranks=1",
        "learner.gpus_per_rank=0.4", "scorer.gpus_per_actor=0.15", "rollout.gpus_per_actor=0.15",
        "reward.gpus_per_actor=0.15", f"train.output_dir={tmp_path}"])
    controller = RefineController(cfg, len(load_tokenizer()))
    try:
        controller.step()
        controller.save()
        exp = controller.last_experience
        rewards = exp.rewards.rewards.copy()
        G, n = cfg.refine.samples_per_prefix, cfg.refine.n_chunks
        rewards[(1 * n + 1) * G + 1] = np.nan                     # document 1, cut 1, sample 1
        bad = dataclasses.replace(exp, rewards=dataclasses.replace(exp.rewards, rewards=rewards))
        with pytest.raises(NonFiniteReward) as e:
            controller.advantages(bad)
        line = str(e.value)
        doc = int(exp.scored.docs.doc_ids[1])
        assert "\n" not in line and isinstance(e.value, LearnerFailure)      # the CLI: one line, exit 3
        assert f"the reward of document {doc} of the corpus, cut 1, sample 1 is nan (1 of {rewards.size}" in line
        assert "the step was not applied" in line and "step_000001" in line, line
        assert np.isfinite(controller.advantages(exp)).all()                 # the real rewards pass
    finally:
        controller.shutdown()

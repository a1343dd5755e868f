"""The learning signal through the Ray system (issue 15 points 2-3): the frozen-reference reward in
the reward role, the per-step collapse indicators, and the fixed-cut held-out evaluation logged
beside the held-out NTP loss (in the step metrics, hence metrics.jsonl and TensorBoard)."""
import json

import numpy as np
import pytest
import torch

from refine_ray.algo import cosine_reward
from refine_ray.config import load_config
from refine_ray.data import load_tokenizer
from refine_ray.refine.frozen_reference import reference_hidden
from refine_ray.refine.policy import build_policy
from refine_ray.system.controller import RefineController
from refine_ray.system.metrics_log import MetricsLogger


@pytest.mark.slow
def test_frozen_reward_collapse_indicators_and_fixed_cut_evaluation(cluster, tmp_path):
    cfg = load_config("configs/tiny_deltanet_mid.yaml", [
        "refine.reward_source=frozen", "learner.num_ranks=1", "learner.gpus_per_rank=0.25",
        "data.max_length=200", "refine.n_chunks=3", "train.val_path=../shared/data/longbench/qmsum_16384.parquet",
        "train.val_every=1", "train.val_docs=2", "train.val_cuts=4", f"train.output_dir={tmp_path}"])
    vocab = len(load_tokenizer())
    controller = RefineController(cfg, vocab)
    logger = MetricsLogger(tmp_path)
    try:
        history = []
        for _ in range(2):
            history.append(controller.step())
            logger.log(controller.step_index, history[-1])
        exp = controller.last_experience
    finally:
        controller.shutdown()
        logger.close()
    # the reward role's rewards are the cosine on the INITIAL weights' hidden states
    initial = build_policy(cfg.model, vocab, "cpu").eval()
    G, per_doc = cfg.refine.samples_per_prefix, cfg.refine.n_chunks * cfg.refine.samples_per_prefix
    for d in range(len(exp.scored.docs)):
        resp_h, true_h = reference_hidden(initial, torch.from_numpy(exp.scored.docs.doc(d)),
                                          torch.from_numpy(exp.scored.cuts[d]),
                                          torch.from_numpy(exp.rollout.tokens[d * per_doc:(d + 1) * per_doc]), G)
        want = cosine_reward(resp_h, true_h.repeat_interleave(G, 0)).numpy()
        np.testing.assert_allclose(exp.rewards.rewards[d * per_doc:(d + 1) * per_doc], want, atol=1e-5)
    step_keys = {"train_cuts/reward_mean", "train_cuts/cosine_mean", "cut_entropy", "collapse/hidden_pair_cosine",
                 "collapse/distinct_token_frac"}
    val_keys = {"val/ntp_loss", "val/nsp_exact", "val/nsp_exact_greedy", "val/nsp_exact_greedy_seq",
                "val/nsp_cosine_policy", "val/nsp_cosine_frozen", "val/nsp_cosine_frozen_random",
                "val/hidden_pair_cosine", "val/cut_entropy", "val/distinct_token_frac"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for metrics in history + rows:
        assert step_keys | val_keys <= set(metrics)
        assert "reward/mean" not in metrics
        assert -1 <= metrics["collapse/hidden_pair_cosine"] <= 1 and 0 < metrics["collapse/distinct_token_frac"] <= 1
    # fixed cuts, fixed random tokens, frozen reference: the control is one number at every evaluation
    assert history[0]["val/nsp_cosine_frozen_random"] == history[1]["val/nsp_cosine_frozen_random"]
    assert history[0]["val/nsp_cosine_policy"] != history[1]["val/nsp_cosine_policy"]   # the weights moved
    assert list((tmp_path / "tensorboard").glob("events.*"))

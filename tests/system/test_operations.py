"""Operating the system: exact resume, actor deaths mid-step, a dead learner, elastic rollouts.

Real local Ray clusters (one with logical GPUs; a multi-node ray.cluster_utils.Cluster
for elasticity), a real DeepSpeed learner over gloo, LongBench text.
"""

import logging

import numpy as np
import pytest
import ray

from refine_ray.transport import checkpoint as ckpt
from refine_ray.config import load_config
from refine_ray.data import load_tokenizer
from refine_ray.system.controller import LearnerFailure, RefineController

BASE = ["data.max_length=160", "refine.n_chunks=2", "refine.response_length=4", "learner.num_ranks=1",
        "learner.gpus_per_rank=0.4", "scorer.gpus_per_actor=0.15", "rollout.gpus_per_actor=0.15",
        "reward.gpus_per_actor=0.15", "reference.gpus_per_actor=0.15", "reference.enabled=true", "refine.kl_coef=0.02"]


def _cfg(tmp_path, *extra):
    return load_config("configs/tiny_deltanet_mid.yaml", BASE + [f"train.output_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def vocab():
    return len(load_tokenizer())


@pytest.fixture
def cluster():
    ray.init(address="local", num_cpus=8, num_gpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _run(cfg, vocab, steps, save_at=None):
    controller = RefineController(cfg, vocab)
    out = []
    try:
        for _ in range(steps):
            out.append(controller.step())
            if save_at is not None and controller.step_index == save_at:
                controller.save()
    finally:
        controller.shutdown()
    return out


@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow)])
def test_resume_continues_exactly(cluster, tmp_path, vocab, mode):
    full = _run(_cfg(tmp_path / "full", f"system.mode={mode}"), vocab, 4)
    first = _run(_cfg(tmp_path / "split", f"system.mode={mode}"), vocab, 2, save_at=2)
    assert ckpt.latest_checkpoint(tmp_path / "split").name == "step_000002"
    resumed = _run(_cfg(tmp_path / "split", f"system.mode={mode}"), vocab, 2)
    for key in ("loss", "ntp_loss", "pg_loss", "kl", "train_cuts/reward_mean", "version"):
        np.testing.assert_allclose([m[key] for m in first + resumed], [m[key] for m in full],
                                   rtol=1e-6, atol=1e-7, err_msg=key)


def test_crash_mid_save_keeps_previous_checkpoint(cluster, tmp_path, vocab):
    cfg = _cfg(tmp_path)
    controller = RefineController(cfg, vocab)
    try:
        controller.step()
        good = controller.save()
        controller.step()
        tmp, final = ckpt.begin_save(cfg.train.output_dir, controller.step_index)   # a save that never commits
        (tmp / "learner").mkdir()
        (tmp / "learner" / "half_written.pt").write_bytes(b"\0" * 100)
        assert str(ckpt.latest_checkpoint(cfg.train.output_dir)) == good and not final.exists()
        controller.save()                                                            # next save cleans up
        assert not list(ckpt.checkpoint_root(cfg.train.output_dir).glob("*.tmp-*"))
        assert ckpt.latest_checkpoint(cfg.train.output_dir).name == "step_000002"
    finally:
        controller.shutdown()


@pytest.mark.parametrize("role", ["rollout"] + [pytest.param(r, marks=pytest.mark.slow)
                                                for r in ("reward", "reference", "scorer")])
def test_actor_killed_mid_step_loses_nothing(cluster, tmp_path, vocab, role):
    """Kill an inference actor while the step's work is in flight: the step completes with
    exactly the samples (same documents, same tokens) of an undisturbed run."""
    # rollout: two scorer shards feed the one rollout actor, so both shards see its death
    extra = ["scorer.num_actors=2", "scorer.gpus_per_actor=0.075"] if role == "rollout" else []
    reference = _run(_cfg(tmp_path / "ref", *extra), vocab, 1)
    cfg = _cfg(tmp_path / "kill", *extra)
    controller = RefineController(cfg, vocab)
    try:
        gen = controller.experience.launch(0, controller.cursor.next_rows(cfg.data.batch_size))
        ray.kill(controller.groups[role].actors[0], no_restart=True)
        controller.pending = gen
        metrics = controller.step()
        exp = controller.last_experience
        assert metrics["actor_failures_total"] >= 1
        assert exp.rollout.tokens.shape[0] == cfg.data.batch_size * cfg.refine.n_chunks * cfg.refine.samples_per_prefix
        for key in ("loss", "train_cuts/reward_mean", "samples"):
            np.testing.assert_allclose(metrics[key], reference[0][key], rtol=1e-6, err_msg=key)
        metrics = controller.step()          # the replacement serves the next step with the new weights
        assert np.isfinite(metrics["loss"]) and metrics["staleness"] == 0
    finally:
        controller.shutdown()


def test_dead_learner_stops_with_resume_message(cluster, tmp_path, vocab):
    cfg = _cfg(tmp_path)
    controller = RefineController(cfg, vocab)
    try:
        controller.step()
        controller.save()
        ray.kill(controller.learners.actors[0], no_restart=True)
        with pytest.raises(LearnerFailure, match="learner rank died .* resume from checkpoint .*step_000001"):
            controller.step()
    finally:
        controller.shutdown()


def test_rollout_pool_grows_and_shrinks_with_nodes(tmp_path, vocab, caplog):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 2})
    ray.init(address=cluster.address)
    try:
        cfg = _cfg(tmp_path, "rollout.max_actors=3", "rollout.cpus_per_actor=1", "rollout.gpus_per_actor=0",
                   "reference.enabled=false", "refine.kl_coef=0", "scorer.cpus_per_actor=0.5",
                   "reward.cpus_per_actor=0.5", "learner.cpus_per_rank=0.5")
        caplog.set_level(logging.WARNING, logger="refine_ray")
        controller = RefineController(cfg, vocab)
        try:
            assert ("rollout.max_actors=3: room for 0 of 2 elastic rollout actors now: each asks for {CPU: 1}, the "
                    "cluster has {CPU: 0.5} free; the pool grows when nodes with these resources join"
                    in caplog.messages)                            # said at start
            assert controller.step()["rollout_actors"] == 1        # the head is full
            node = cluster.add_node(num_cpus=2)
            cluster.wait_for_nodes()
            assert controller.step()["rollout_actors"] == 3        # two elastic actors on the new node
            cluster.remove_node(node)
            m = controller.step()                                  # their deaths are healed by dropping them
            assert np.isfinite(m["loss"]) and m["samples"] == cfg.data.batch_size * 2 * 2
            assert controller.step()["rollout_actors"] == 1
        finally:
            controller.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize("role", ["rollout", pytest.param("scorer", marks=pytest.mark.slow)])
def test_async_pending_work_lost_to_a_dead_actor_is_redone_with_its_weights(cluster, tmp_path, vocab, role):
    """Async: step 1's work is launched with weights v0 while the learner trains step 0 and then
    publishes v1. An actor dies with that work unfinished: the work is issued again on v0 (kept
    for it), so its samples are bit for bit those of the same work undisturbed, and the actors
    serve the next step with the current weights."""
    cfg = _cfg(tmp_path, "system.mode=async", "reference.enabled=false", "refine.kl_coef=0")
    controller = RefineController(cfg, vocab)
    maker, launch, undisturbed = controller.experience, controller.experience.launch, []

    def launch_and_lose(step, rows):
        if step == 1:   # the pending work of async step 0: its undisturbed samples, then the actor dies
            undisturbed.append(maker.collect(launch(step, rows)))
            ray.kill(controller.groups[role].actors[0], no_restart=True)
        return launch(step, rows)

    maker.launch = launch_and_lose
    try:
        controller.step()
        metrics = controller.step()              # collects step 1's work: the actor's death shows here
        exp, (ref,) = controller.last_experience, undisturbed
        assert metrics["actor_failures_total"] == 1 and metrics["version"] == 2
        assert metrics["staleness"] == 1 and set(exp.rollout.versions.tolist()) == {0}
        np.testing.assert_array_equal(exp.scored.cuts, ref.scored.cuts)
        np.testing.assert_array_equal(exp.rollout.tokens, ref.rollout.tokens)
        np.testing.assert_array_equal(exp.rollout.logprobs, ref.rollout.logprobs)
        np.testing.assert_array_equal(exp.rewards.rewards, ref.rewards.rewards)
        metrics = controller.step()              # step 2's work was launched after the repair, with v1
        assert set(controller.last_experience.rollout.versions.tolist()) == {1} and metrics["staleness"] == 1
    finally:
        controller.shutdown()

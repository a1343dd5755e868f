"""Waiting on the cluster (issue 24 point 13 and the elastic pool's room): a replacement actor whose
node left is reported at a fixed interval naming its bundle, stops the run after
``system.wait_timeout_s`` with one line, and its role's death is counted once; an elastic rollout
pool the cluster has no room for says so at start.

A multi-node ``ray.cluster_utils.Cluster`` on one machine (head with 2 logical GPUs; nodes that
advertise the KubeRay groups' custom resources join and leave), real roles, LongBench text.
"""
import logging
import threading
import time

import numpy as np
import pytest
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from refine_ray.config import ConfigError, load_config
from refine_ray.data import load_tokenizer
from refine_ray.system.actor_group import ActorGroup, ClusterWaitTimeout, elastic_shortfall, wait_started
from refine_ray.system.placement import Placement
from roles.reference import ReferenceRole

INFERENCE_NODE = {"num_cpus": 2, "resources": {"refine_rollout": 2, "refine_aux": 1}}


@pytest.fixture(scope="module")
def nodes():
    """A head (4 CPUs, 2 logical GPUs, the learner's resource) that tests add nodes to."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 2,
                                                            "resources": {"refine_learner": 1}})
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _cfg(*overrides):
    return load_config("configs/tiny_deltanet_mid.yaml", list(overrides))


def test_wait_settings_are_checked():
    with pytest.raises(ConfigError, match=r"^system.wait_timeout_s: -1.0 must be >= 0 \(0: wait until"):
        _cfg("system.wait_timeout_s=-1")
    with pytest.raises(ConfigError, match=r"^system.wait_report_s: 0.0 must be > 0"):
        _cfg("system.wait_report_s=0")


def test_elastic_pool_without_room_says_so(nodes):
    """Two logical GPUs, colocated: the placement group holds both whole GPUs, so no elastic rollout
    actor (0.25 GPU each) fits; the start-up line names what each asks for and what is free."""
    cfg = _cfg("rollout.max_actors=3", "system.num_cpus=null", "system.num_gpus=null")
    placement = Placement(cfg)
    try:
        line = elastic_shortfall(cfg.rollout, colocated=True, local=True)
        assert line == ("rollout.max_actors=3: room for 0 of 2 elastic rollout actors now: each asks for "
                        "{CPU: 0.5, GPU: 0.25}, the cluster has {CPU: 1.5, GPU: 0} free (system.placement=colocated: "
                        "the placement group holds a whole GPU per learner rank); a local cluster gets no new nodes, "
                        "so the pool stays at 1")
        assert elastic_shortfall(cfg.rollout, colocated=True, local=False).endswith(
            "the pool grows when nodes with these resources join")
        assert elastic_shortfall(_cfg("rollout.max_actors=1").rollout, colocated=True, local=True) is None
    finally:
        placement.remove()
    deadline = time.monotonic() + 30
    while ray.available_resources().get("GPU", 0) < 2 and time.monotonic() < deadline:   # released asynchronously
        time.sleep(0.2)
    assert elastic_shortfall(cfg.rollout, colocated=True, local=True) is None     # both GPUs free again


def test_replacement_without_a_node_is_reported_bounded_and_counted_once(nodes, caplog):
    """The node holding a reference actor's bundle leaves: the actor is dead once; its replacement
    waits for the bundle (not dead, however long it does not answer), a line every report_s names
    it and its bundle, and after the limit one line stops the wait."""
    node = nodes.add_node(**INFERENCE_NODE)
    nodes.wait_for_nodes()
    cfg, vocab = _cfg(), len(load_tokenizer())
    pg = placement_group([{"CPU": 0.5, "refine_aux": 1}], name="test:reference")
    ray.get(pg.ready(), timeout=60)
    options = {"num_cpus": 0.5, "resources": {"refine_aux": 1},
               "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                       placement_group_bundle_index=0)}
    group = ActorGroup("reference", ReferenceRole, lambda i: dict(model=cfg.model, refine=cfg.refine, vocab_size=vocab, run_seed=0, actor_index=i),
                       lambda i: options, 1)
    try:
        group.ready()
        nodes.remove_node(node)
        assert group.replace_dead() == 1
        assert group.replace_dead() == 0       # the replacement waits for its bundle: not dead
        caplog.set_level(logging.WARNING, logger="refine_ray")
        began = time.monotonic()
        with pytest.raises(ClusterWaitTimeout) as stop:
            wait_started([group], limit_s=5, report_s=2, hint=lambda: "stopping at step 7")
        assert 5 <= time.monotonic() - began < 20
        waits = "reference[0] waits for bundle 0 {CPU: 0.5, refine_aux: 1} of placement group 'test:reference' ("
        assert str(stop.value).startswith("1 replacement actor found no node for ")
        assert f"(system.wait_timeout_s=5): {waits}" in str(stop.value) and "\n" not in str(stop.value)
        assert str(stop.value).endswith("free; stopping at step 7")
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting ")]
        assert lines and all(waits in line and "stopping after system.wait_timeout_s=5 s" in line for line in lines)
    finally:
        group.kill_all()
        ray.util.remove_placement_group(pg)


LAYOUT = ["data.max_length=160", "refine.n_chunks=2", "refine.response_length=4", "learner.num_ranks=1",
          "system.placement=disaggregated", "learner.resources.refine_learner=1", "scorer.resources.refine_rollout=1",
          "rollout.resources.refine_rollout=1", "reward.resources.refine_aux=1", "learner.gpus_per_rank=0",
          "scorer.gpus_per_actor=0", "rollout.gpus_per_actor=0", "reward.gpus_per_actor=0",
          "system.wait_report_s=3", "system.wait_timeout_s=30"]


def _losses(controller, steps):
    return [controller.step()["loss"] for _ in range(steps)]


@pytest.mark.slow
def test_node_with_the_inference_bundles_leaves_and_returns_or_the_run_stops(nodes, tmp_path, caplog):
    """Disaggregated: the learner on the head, scorer, rollout and reward bundles on one node. The node
    leaves during a run: the step waits, a line every 3 s names the three replacements and their bundles;
    a node that can hold them returns within system.wait_timeout_s and the step completes with the
    losses of an undisturbed run, 3 deaths counted 3 times. The node leaves again and nothing returns:
    the step stops with one ClusterWaitTimeout line after the limit. ~4 minutes on 2 busy cores."""
    from refine_ray.system.controller import RefineController

    vocab = len(load_tokenizer())
    node = nodes.add_node(**INFERENCE_NODE)
    nodes.wait_for_nodes()
    undisturbed = RefineController(_cfg(*LAYOUT, f"train.output_dir={tmp_path / 'undisturbed'}"), vocab)
    try:
        expected = _losses(undisturbed, 2)
    finally:
        undisturbed.shutdown()
    controller = RefineController(_cfg(*LAYOUT, f"train.output_dir={tmp_path / 'run'}"), vocab)
    caplog.set_level(logging.WARNING, logger="refine_ray")
    try:
        losses = _losses(controller, 1)
        nodes.remove_node(node)
        step = threading.Thread(target=lambda: losses.extend(_losses(controller, 1)))   # waits for the node
        step.start()
        while not (lines := [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting ")]):
            assert step.is_alive()
            time.sleep(0.5)
        assert "for 3 replacement actors: scorer[0] waits for bundle 0 {CPU: 0.5, refine_rollout: 1} of placement " \
               "group 'tiny-deltanet-mid:scorer' (RESCHEDULING: no node can hold it now); rollout[0] waits " in lines[0]
        assert "reward[0] waits for bundle 0 {CPU: 0.5, refine_aux: 1}" in lines[0]
        node = nodes.add_node(**INFERENCE_NODE)        # a node returns within the limit: the step completes
        step.join()
        np.testing.assert_allclose(losses, expected, rtol=1e-6)
        assert controller.failures == 3
        nodes.remove_node(node)
        began = time.monotonic()
        with pytest.raises(ClusterWaitTimeout) as stop:
            controller.step()
        assert 30 <= time.monotonic() - began < 120 and "\n" not in str(stop.value)
        assert str(stop.value).startswith("3 replacement actors found no node for 3")
        assert str(stop.value).endswith("stopping at step 2. Run the same command again to resume from the start "
                                        "(no checkpoint yet).")
        assert controller.failures == 6
    finally:
        controller.shutdown()

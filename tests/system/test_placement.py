"""Placement planning (pure) and real placement groups on a local cluster with logical GPUs."""
import time

import pytest
import ray

from refine_ray.config import ConfigError, load_config
from refine_ray.system.placement import Placement, bundle_specs, check_resources, plan_slots


def _cfg(*overrides):
    return load_config("configs/tiny_deltanet_mid.yaml", list(overrides))


def test_colocated_plan_shares_bundles():
    slots = plan_slots(_cfg("reference.enabled=true"))
    by_role = {(s.role, s.index): s for s in slots}
    assert by_role[("learner", 0)].bundle == 0 and by_role[("learner", 1)].bundle == 1
    assert {s.group for s in slots} == {"shared"}
    # scorer, rollout, reward, reference spread round-robin over the two learner bundles
    assert [by_role[(r, 0)].bundle for r in ("scorer", "rollout", "reward", "reference")] == [0, 1, 0, 1]
    specs = bundle_specs(slots)
    assert specs == {"shared": [{"GPU": 1.0, "CPU": 1.5}, {"GPU": 1.0, "CPU": 1.5}]}


def test_colocated_oversubscription_is_rejected():
    with pytest.raises(ConfigError, match="GPU shares on bundle 0 add up to 1.5 > 1"):
        plan_slots(_cfg("learner.gpus_per_rank=0.75", "scorer.gpus_per_actor=0.5"))


def test_disaggregated_plan_one_group_per_role():
    slots = plan_slots(_cfg("system.placement=disaggregated", "rollout.num_actors=3"))
    specs = bundle_specs(slots)
    assert set(specs) == {"learner", "scorer", "rollout", "reward"}
    assert specs["rollout"] == [{"GPU": 0.25, "CPU": 0.5}] * 3
    assert specs["learner"] == [{"GPU": 0.5, "CPU": 0.5}] * 2


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
def test_cpu_shortfall_is_caught_before_ray_starts(placement):
    """Every role's actors x cpus_per_actor, learner ranks included, against system.num_cpus (no Ray)."""
    shape = [f"system.placement={placement}", "learner.cpus_per_rank=0.75"]
    with pytest.raises(ConfigError) as e:
        check_resources(_cfg(*shape, "system.num_cpus=2"))
    assert ("system.num_cpus: the layout needs 3 CPUs (learner 2 x 0.75, scorer 1 x 0.5, rollout 1 x 0.5, "
            "reward 1 x 0.5) but system.num_cpus=2") in str(e.value)
    check_resources(_cfg(*shape, "system.num_cpus=3"))                     # exactly fits
    check_resources(_cfg(*shape, "system.num_cpus=null"))                  # auto-detected: checked once Ray is up
    with pytest.raises(ConfigError, match=r"system.num_gpus: the layout needs 2 GPUs .* but system.num_gpus=1"):
        check_resources(_cfg("system.num_gpus=1", "system.placement=colocated"))
    assert not ray.is_initialized()


@pytest.fixture
def ray_cluster():
    ray.init(address="local", num_cpus=4, num_gpus=3, include_dashboard=False)
    yield
    ray.shutdown()


def test_real_placement_groups_schedule(ray_cluster):
    cfg = _cfg("system.placement=disaggregated", "learner.gpus_per_rank=1", "learner.num_ranks=1",
               "data.batch_size=1", "scorer.gpus_per_actor=0.5", "rollout.gpus_per_actor=0.5",
               "reward.gpus_per_actor=0")
    placement = Placement(cfg)

    @ray.remote
    def where():
        return ray.get_gpu_ids(), ray.get_runtime_context().get_placement_group_id()

    gpus, pg = ray.get(where.options(**placement.options("learner", 0)).remote())
    assert len(gpus) == 1 and pg == placement.groups["learner"].id.hex()
    gpus, pg = ray.get(where.options(**placement.options("reward", 0)).remote())
    assert gpus == [] and pg == placement.groups["reward"].id.hex()
    placement.remove()


def test_too_few_gpus_is_a_clear_error(ray_cluster):
    with pytest.raises(ConfigError, match=r"needs 4 GPUs \(learner 2 x 1, scorer 1 x 1, rollout 1 x 0, reward 1 x 1\) but the Ray cluster has 3"):
        Placement(_cfg("system.placement=disaggregated", "learner.gpus_per_rank=1",
                       "scorer.gpus_per_actor=1", "rollout.gpus_per_actor=0", "reward.gpus_per_actor=1"))


def test_too_few_cpus_fails_at_once_not_after_the_wait(ray_cluster):
    """A cluster that can never hold the CPUs (auto-detected or remote) fails in seconds, not after 120 s."""
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"needs 5 CPUs \(learner 2 x 1.5, scorer 1 x 1, rollout 1 x 0.5, reward 1 x 0.5\) "
                                          r"but the Ray cluster has 4"):
        Placement(_cfg("learner.cpus_per_rank=1.5", "scorer.cpus_per_actor=1"))
    assert time.monotonic() - start < 10


# Custom resources pin roles to node groups (the KubeRay worker groups advertise refine_learner, ...).
PINNED = ("learner.resources.refine_learner=1", "scorer.resources.refine_rollout=1",
          "rollout.resources.refine_rollout=1", "reward.resources.refine_aux=1")


def test_bundles_carry_the_roles_custom_resources():
    specs = bundle_specs(plan_slots(_cfg("system.placement=disaggregated", "rollout.num_actors=2", *PINNED)))
    assert specs["learner"] == [{"GPU": 0.5, "CPU": 0.5, "refine_learner": 1.0}] * 2
    assert specs["rollout"] == [{"GPU": 0.25, "CPU": 0.5, "refine_rollout": 1.0}] * 2
    assert specs["reward"] == [{"GPU": 0.25, "CPU": 0.5, "refine_aux": 1.0}]
    # colocated: a shared bundle holds the sum of its members' amounts
    specs = bundle_specs(plan_slots(_cfg("learner.resources.refine_learner=1", "scorer.resources.refine_learner=0.5")))
    assert specs["shared"] == [{"GPU": 1.0, "CPU": 1.5, "refine_learner": 1.5}, {"GPU": 1.0, "CPU": 1.0,
                                                                                 "refine_learner": 1.0}]


def test_custom_resources_the_cluster_lacks_are_a_clear_error():
    with pytest.raises(ConfigError) as e:
        check_resources(_cfg("system.placement=disaggregated", *PINNED))
    assert str(e.value).startswith("learner.resources: the layout needs 2 of custom resource 'refine_learner' "
                                   "(learner.resources) but the local cluster (no system.ray_address) has 0")


def test_custom_resources_pin_roles_to_the_nodes_that_advertise_them():
    """A two-node local cluster whose nodes advertise refine_rollout + refine_aux / refine_learner (as the
    KubeRay worker groups do): every actor runs on the node holding its role's resource, although the
    head (where Ray would otherwise put everything) has room for the whole layout. ~20 s."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 2,
                                                            "resources": {"refine_rollout": 2, "refine_aux": 1}})
    rollout_node = cluster.head_node
    learner_node = cluster.add_node(num_cpus=1, num_gpus=1, resources={"refine_learner": 2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        cfg = _cfg("system.placement=disaggregated", "system.num_cpus=null", "system.num_gpus=null", *PINNED)
        placement = Placement(cfg)

        @ray.remote(num_cpus=0)
        def node():
            return ray.get_runtime_context().get_node_id()

        where = {(s.role, s.index): ray.get(node.options(**placement.options(s.role, s.index)).remote())
                 for s in placement.slots}
        assert {where[("learner", 0)], where[("learner", 1)]} == {learner_node.node_id}
        assert {where[(r, 0)] for r in ("scorer", "rollout", "reward")} == {rollout_node.node_id}
        placement.remove()
        with pytest.raises(ConfigError, match=r"learner.resources: the layout needs 3 of custom resource "
                                              r"'refine_learner' \(learner.resources\) but the Ray cluster has 2"):
            Placement(_cfg("system.placement=disaggregated", "learner.num_ranks=3", "data.batch_size=3", *PINNED))
    finally:
        ray.shutdown()
        cluster.shutdown()

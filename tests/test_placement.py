"""Placement planning (pure) and real placement groups on a local cluster with logical GPUs."""
import pytest
import ray

from refine_ray.config import ConfigError, load_config
from refine_ray.placement import Placement, bundle_specs, plan_slots


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


@pytest.fixture
def ray_cluster():
    ray.init(num_cpus=4, num_gpus=3, include_dashboard=False)
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
    with pytest.raises(ConfigError, match="needs 4 GPUs but the Ray cluster has 3"):
        Placement(_cfg("system.placement=disaggregated", "learner.gpus_per_rank=1",
                       "scorer.gpus_per_actor=1", "rollout.gpus_per_actor=0", "reward.gpus_per_actor=1"))

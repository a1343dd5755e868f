"""The driver of a REFINE run: everything here runs in the driver process, none of it in a role.

* ``controller.py``: :class:`RefineController`, the single controller; its ``step()`` is the
  algorithm (score -> rollout -> reward (+ reference model) -> advantages -> learn -> publish).
* ``experience.py``: launch, collect, retry and staleness of one step's chains of role calls.
* ``actor_group.py``: one actor-group type for every role (learner ranks included), sharding
  by whole documents, the one-line :class:`LearnerFailure`.
* ``placement.py``: placement groups; ``run_dir.py``: run directories; ``metrics_log.py``,
  ``ray_metrics.py``, ``trackers.py``, ``run_log.py``: metric sinks and logs;
  ``memory_plan.py``: the memory plan.

The roles (top-level ``roles/``) and what they exchange with the driver
(``refine_ray.transport``: batches, weight sync, checkpoint files) sit below this package.
"""

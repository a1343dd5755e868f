"""The Ray / distributed layer of refine-ray.

* ``controller.py``: :class:`RefineController`, the single controller; its ``step()`` is the
  algorithm (score -> rollout -> reward (+ reference) -> advantages -> learn -> publish).
* ``experience.py``: launch, collect, retry and staleness of one step's chains of role calls.
* ``actor_group.py``: one actor-group type for every role (learner ranks included), sharding
  by whole documents, the one-line :class:`LearnerFailure`.
* ``weight_sync/``: learner -> inference weights, one tensor set, backends side by side.
* ``batches.py``: transport batches (contiguous numpy) between roles.
* ``learner.py``: one DeepSpeed rank; ``placement.py``: placement groups; ``checkpoint.py``,
  ``run_dir.py``: checkpoints and run directories; ``metrics_log.py``, ``ray_metrics.py``:
  metric sinks; ``kuberay.py``: manifest checks.

Only the controller imports ``roles/`` (the actor classes); everything else here is imported
by the roles or the entry modules.
"""

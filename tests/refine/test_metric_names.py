"""One name per step metric on both step paths: the single-process step (LocalRefineStep) logs its
advantages under the names the Ray controller logs (``advantage/*``), from one helper.

The controller's names are read from its source without importing it (no Ray needed): the string
keys it writes that start with ``adv``, plus :func:`advantage_metrics`' keys where it calls that helper.
"""
import ast
import importlib.util
from pathlib import Path

import torch

from refine_ray.config import RefineConfig
from refine_ray.models.registry import build_model
from refine_ray.refine.local_step import LocalRefineStep
from refine_ray.refine.rewarding import advantage_metrics

V = 61
CFG = RefineConfig(n_chunks=2, response_length=3, samples_per_prefix=2, min_prefix=8)


def _advantage_keys(metrics) -> set[str]:
    return {k for k in metrics if k.startswith("adv")}


def _controller_advantage_names() -> set[str]:
    path = Path(importlib.util.find_spec("refine_ray.system.controller").origin)
    tree = ast.parse(path.read_text(), str(path))
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and n.value.startswith("adv") and "/" in n.value}
    if any(isinstance(n, ast.Name) and n.id == "advantage_metrics" for n in ast.walk(tree)):
        names |= _advantage_keys(advantage_metrics(torch.zeros(2)))
    return names


def test_local_step_and_controller_log_advantages_under_one_name():
    model = build_model("delta_net", seed=0, vocab_size=V)
    step = LocalRefineStep(model, torch.optim.SGD(model.parameters(), lr=0.0), CFG, seed=0)
    docs = [torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    exp = step.collect(docs, [0, 1])
    local = _advantage_keys(exp.metrics)
    assert local == _controller_advantage_names() == {"advantage/mean", "advantage/abs_mean"}
    assert exp.metrics["advantage/abs_mean"] == float(exp.advantages.double().abs().mean())
    assert _advantage_keys(step.update(docs, exp)) == local          # what step() returns carries them too

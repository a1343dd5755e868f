"""Headline training figures as Ray metrics, scraped by Prometheus from every node.

    exporter = RayMetricsExporter(cfg.name)     # after ray.init(), in the driver
    exporter.record(metrics)                    # once per step, the dict RefineController.step returns

Each figure is a :class:`ray.util.metrics.Gauge` named ``refine_<key>`` (key
sanitised for Prometheus: ``reward/mean`` -> ``refine_reward_mean``), which the
node's metrics agent exports as ``ray_refine_reward_mean{run="<name>",...}`` on
its metrics export port about 10 s after it is set. Two counters count steps and
samples (exported as ``ray_refine_steps_total`` and ``ray_refine_samples_total``).
Keys that are not headline figures, and values that are not finite numbers, are
ignored, so ``record`` takes the whole step dict.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Optional

HEADLINE = ("loss", "ntp_loss", "pg_loss", "train_cuts/reward_mean", "cut_entropy", "kl", "clipfrac",
            "grad_norm", "lr", "staleness", "tokens_per_s", "time/step_s")
PREFIX = "refine_"
_BAD = re.compile(r"[^a-zA-Z0-9_]+")


def prometheus_name(key: str, prefix: str = PREFIX) -> str:
    """``reward/mean`` -> ``refine_reward_mean``: a valid Prometheus metric name."""
    body = _BAD.sub("_", key).strip("_").lower()
    if not body:
        raise ValueError(f"metric key {key!r}: nothing left after sanitising for Prometheus")
    return prefix + body


class RayMetricsExporter:
    """Gauges for the headline figures plus step/sample counters, tagged with the run name."""

    def __init__(self, run: str, keys: tuple[str, ...] = HEADLINE, tags: Optional[Mapping[str, str]] = None):
        """Register one gauge per metric key in ``keys`` plus the step and sample counters, tagged
        ``run`` (and ``tags``). Raises RuntimeError before ``ray.init``, ValueError for keys whose
        Prometheus names clash."""
        import ray
        from ray.util.metrics import Counter, Gauge

        if not ray.is_initialized():
            raise RuntimeError("RayMetricsExporter: call ray.init() first (metrics go through the node's agent)")
        self.tags = {"run": str(run), **{str(k): str(v) for k, v in (tags or {}).items()}}
        tag_keys = tuple(self.tags)
        names = {}
        for key in keys:
            name = prometheus_name(key)
            if name in names.values():
                raise ValueError(f"metric key {key!r}: Prometheus name {name} clashes with another key")
            names[key] = name
        self.names = names
        self.gauges = {key: Gauge(name, description=f"refine-ray '{key}' at the last recorded step",
                                  tag_keys=tag_keys) for key, name in names.items()}
        self.steps = Counter(PREFIX + "steps", description="refine-ray training steps recorded",
                             tag_keys=tag_keys)
        self.samples = Counter(PREFIX + "samples", description="refine-ray rollout samples trained on",
                               tag_keys=tag_keys)

    def record(self, metrics: Mapping[str, float]) -> int:
        """Set every known figure in ``metrics``; count one step and ``metrics['samples']``.
        Returns how many gauges were set."""
        n = 0
        for key, value in metrics.items():
            gauge = self.gauges.get(key)
            if gauge is None or not _finite(value):
                continue
            gauge.set(float(value), tags=self.tags)
            n += 1
        self.steps.inc(1.0, tags=self.tags)
        samples = metrics.get("samples")
        if _finite(samples) and float(samples) > 0:
            self.samples.inc(float(samples), tags=self.tags)
        return n


def _finite(value) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False

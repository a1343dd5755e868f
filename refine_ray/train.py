"""Run a REFINE training job from a config: the loop around :class:`RefineTrainer`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from refine_ray.config import ExperimentConfig, to_dict

log = logging.getLogger("refine_ray")


def run_training(cfg: ExperimentConfig) -> list[dict]:
    """Train for ``cfg.train.steps`` steps; returns the per-step metrics."""
    from refine_ray.preflight import preflight

    report = preflight(cfg)   # bad inputs stop here, one line, before Ray or any file is touched
    tokenizer = report.tokenizer
    from refine_ray.driver import RefineTrainer

    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    from refine_ray.metrics_log import MetricsLogger

    logger = MetricsLogger(out)
    trainer = RefineTrainer(cfg, len(tokenizer), lengths=report.lengths)
    from refine_ray.ray_metrics import RayMetricsExporter

    exporter = RayMetricsExporter(cfg.name)     # headline figures on the Ray dashboard / Prometheus
    history = []
    try:
        start = trainer.step_index
        if start:
            log.warning("resuming at step %d of %d", start, cfg.train.steps)
        bar = tqdm(range(start, cfg.train.steps), desc=f"{cfg.name} [{cfg.system.mode}]", unit="step",
                   initial=start, total=cfg.train.steps)
        for step in bar:
            metrics = trainer.step()
            exporter.record(metrics)
            history.append(metrics)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
                logger.log(step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", reward=f"{metrics['reward/mean']:.3f}",
                            v=int(metrics["version"]))
            last = step == cfg.train.steps - 1
            if last or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
                trainer.save()
    finally:
        trainer.shutdown()
        logger.close()
    return history

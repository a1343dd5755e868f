"""Run a REFINE training job from a config: the loop around :class:`~refine_ray.system.controller.RefineController`."""
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
    from refine_ray.system.trackers import check_trackers

    check_trackers(cfg.train.loggers)   # a tracker asked for but not installed: one line, nothing started
    report = preflight(cfg)   # bad inputs stop here, one line, before Ray or any file is touched
    from refine_ray.system import checkpoint as ckpt
    from refine_ray.system.controller import RefineController
    from refine_ray.system.metrics_log import MetricsLogger
    from refine_ray.system.run_dir import claim

    if report.resume_from is not None and ckpt.step_of(report.resume_from) >= cfg.train.steps:
        return []                               # already done: nothing to start
    out = Path(cfg.train.output_dir)
    with claim(cfg) as resume_from:       # this run's directory, locked until the run ends
        if resume_from is not None and resume_from != report.resume_from:
            ckpt.verify_checkpoint(resume_from)     # the directory changed after preflight
        partial = out / "config.json.partial"
        partial.write_text(json.dumps(to_dict(cfg), indent=2))
        partial.replace(out / "config.json")
        logger = MetricsLogger(out, resume_step=None if resume_from is None else ckpt.step_of(resume_from),
                               loggers=cfg.train.loggers, name=cfg.name, project=cfg.train.project, config=to_dict(cfg))
        try:
            controller = RefineController(cfg, len(report.tokenizer), lengths=report.lengths, resume_from=resume_from)
        except BaseException:
            logger.close(finished=False)
            raise
        return _train(cfg, controller, logger)


def _train(cfg: ExperimentConfig, controller, logger) -> list[dict]:
    from refine_ray.system.ray_metrics import RayMetricsExporter

    exporter = RayMetricsExporter(cfg.name)     # headline figures on the Ray dashboard / Prometheus
    history, finished = [], False
    try:
        start = controller.step_index
        if start:
            log.warning("resuming after step %d of %d", start, cfg.train.steps)
        bar = tqdm(range(start, cfg.train.steps), desc=f"{cfg.name} [{cfg.system.mode}]", unit="step",
                   initial=start, total=cfg.train.steps)
        for _ in bar:
            metrics = controller.step()
            step = controller.step_index      # 1-based: the state after `step` training steps (bar, logs, step_N)
            exporter.record(metrics)
            history.append(metrics)
            if step % cfg.train.log_every == 0 or step in (1, cfg.train.steps) or "val/ntp_loss" in metrics:
                logger.log(step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", reward=f"{metrics['train_cuts/reward_mean']:.3f}",
                            v=int(metrics["version"]))
            if step == cfg.train.steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
                controller.save()
        finished = True
    finally:
        controller.shutdown()
        logger.close(finished)
    return history

"""Run a REFINE training job from a config: the loop around :class:`~refine_ray.system.controller.RefineController`.

Start-up is reported in phase lines (``refine_ray`` log records: inputs checked, Ray up, learner
ranks ready, inference actors ready, first step) and everything goes to ``<output_dir>/run.log``
(:mod:`refine_ray.system.run_log`). Ctrl-C at any point stops the actors and Ray and raises
:class:`TrainingInterrupted`, whose message is the one line to show; what was saved stays.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm

from refine_ray.config import ExperimentConfig, to_dict

log = logging.getLogger("refine_ray")


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) stopped the run after its actors and Ray were stopped; the message is one line:
    the step reached, the last checkpoint, and that the same command resumes."""


def run_training(cfg: ExperimentConfig) -> list[dict]:
    """Train for ``cfg.train.steps`` steps; returns the per-step metrics (empty: nothing left to do).

    Raises the one-line errors of preflight, the run directory and checkpoints, ``LearnerFailure``,
    and :class:`TrainingInterrupted` on Ctrl-C."""
    reached: list[int] = []                     # steps done so far (the last entry), once known
    try:
        return _run(cfg, reached)
    except KeyboardInterrupt:
        from refine_ray.transport import checkpoint as ckpt

        latest = ckpt.latest_checkpoint(cfg.train.output_dir) if Path(cfg.train.output_dir).is_dir() else None
        where = f"at step {reached[-1]} of {cfg.train.steps}" if reached else "while starting"
        saved = f"last checkpoint '{latest}'" if latest else "no checkpoint yet"
        raise TrainingInterrupted(f"interrupted {where}; {saved}; run the same command to resume") from None


def _run(cfg: ExperimentConfig, reached: list[int]) -> list[dict]:
    from refine_ray.preflight import preflight
    from refine_ray.system.trackers import check_trackers

    check_trackers(cfg.train.loggers)   # a tracker asked for but not installed: one line, nothing started
    report = preflight(cfg)   # bad inputs stop here, one line, before Ray or any file is touched
    from refine_ray.transport import checkpoint as ckpt
    from refine_ray.system import run_log
    from refine_ray.system.controller import RefineController
    from refine_ray.system.metrics_log import MetricsLogger
    from refine_ray.system.run_dir import CONFIG_HISTORY, claim, write_config

    if report.resume_from is not None and ckpt.step_of(report.resume_from) >= cfg.train.steps:
        return []                               # already done: nothing to start
    log.info("inputs checked: %d documents (%d long enough), a %d-token vocabulary%s", report.rows, report.usable,
             report.vocab_size, f"; resuming from {report.resume_from}" if report.resume_from else "")
    from refine_ray.plan import startup_line

    line, fits = startup_line(cfg, report.vocab_size)      # refine-ray plan's verdict, compact
    (log.warning if fits is False else log.info)(line)
    out = Path(cfg.train.output_dir)
    with claim(cfg) as resume_from:       # this run's directory, locked until the run ends
        run_log.attach_driver(out)
        if resume_from is not None and resume_from != report.resume_from:
            ckpt.verify_checkpoint(resume_from)     # the directory changed after preflight
        reached.append(0 if resume_from is None else ckpt.step_of(resume_from))
        changes = write_config(out, to_dict(cfg), None if resume_from is None else ckpt.step_of(resume_from))
        if changes:     # kept in config_history.jsonl; config.json holds the settings from here on
            log.warning("resuming with changed settings (recorded in %s): %s", CONFIG_HISTORY, "; ".join(changes))
        logger = MetricsLogger(out, resume_step=None if resume_from is None else ckpt.step_of(resume_from),
                               loggers=cfg.train.loggers, name=cfg.name, project=cfg.train.project, config=to_dict(cfg))
        try:
            controller = RefineController(cfg, len(report.tokenizer), lengths=report.lengths, resume_from=resume_from)
        except BaseException:
            logger.close(finished=False)
            raise
        return _train(cfg, controller, logger, reached)


def _train(cfg: ExperimentConfig, controller, logger, reached: list[int]) -> list[dict]:
    from refine_ray.system.ray_metrics import RayMetricsExporter

    exporter = RayMetricsExporter(cfg.name)     # headline figures on the Ray dashboard / Prometheus
    history, finished, bar = [], False, None
    try:
        start = controller.step_index
        if start:
            log.warning("resuming after step %d of %d", start, cfg.train.steps)
        bar = tqdm(range(start, cfg.train.steps), desc=f"{cfg.name} [{cfg.system.mode}]", unit="step",
                   initial=start, total=cfg.train.steps)
        for _ in bar:
            began = time.perf_counter()
            metrics = controller.step()
            step = controller.step_index      # 1-based: the state after `step` training steps (bar, logs, step_N)
            reached.append(step)
            if not history:
                log.info("first step done in %.1f s", time.perf_counter() - began)
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
        if bar is not None:
            bar.close()
        controller.shutdown()
        logger.close(finished)
    return history

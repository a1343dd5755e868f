"""Where step metrics go: ``metrics.jsonl``, the trackers of ``train.loggers`` (TensorBoard by default,
W&B, MLflow: :mod:`refine_ray.system.trackers`) and ``summary.png`` at the end.

One step numbering everywhere: step N is the state after N training steps (1-based), the number the
progress bar shows, the ``step`` of ``metrics.jsonl`` rows and tracker points, and the N of checkpoint
``step_N``. A run resumed from ``step_N`` continues with step N + 1.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from refine_ray.system.trackers import open_trackers

# summary.png: one panel per row, drawn when any of its keys was logged:
# (title, y label, [(key, legend)], y axis from 0 for quantities that cannot be negative)
PANELS = (
    ("NTP loss", "nats / token", [("ntp_loss", "train batch"), ("val/ntp_loss", "held-out")], False),
    ("training loss", "NTP + pg_coef·PG (+ kl_coef·KL)", [("loss", None)], False),
    ("policy-gradient loss", "PPO-clip surrogate (unitless)", [("pg_loss", None)], False),
    ("reward at training cuts", "unitless: cosine in [-1, 1], exact in [0, 1]",
     [("train_cuts/reward_mean", "mean"), ("train_cuts/cosine_mean", "cosine"), ("train_cuts/exact_mean", "exact")],
     False),
    ("entropy at cuts", "nats / token", [("cut_entropy", "train cuts"), ("val/cut_entropy", "held-out cuts")], False),
    ("collapse: unrelated-position hidden cosine", "cosine in [-1, 1]",
     [("collapse/hidden_pair_cosine", "train"), ("val/hidden_pair_cosine", "held-out")], False),
    ("held-out next sequence (fixed cuts)", "unitless: exact in [0, 1], cosine in [-1, 1]",
     [("val/nsp_exact_greedy", "greedy exact"), ("val/nsp_cosine_frozen", "cosine (frozen)")], False),
    ("KL to the reference model", "nats / token", [("kl", None)], False),
    ("PPO clip fraction", "fraction of tokens in [0, 1]", [("clipfrac", None)], True),
    ("gradient norm", "global L2 norm", [("grad_norm", None)], True),
    ("step time", "seconds", [("time/step_s", "step"), ("time/learn_s", "learn"),
                              ("time/wait_experience_s", "wait for experience")], True),
    ("throughput", "tokens / s", [("tokens_per_s", None)], True),
)
COLUMNS = 4


class MetricsLogger:
    """``metrics.jsonl`` plus the trackers ``loggers`` for one run directory.

    ``resume_step``: the step of the checkpoint a resumed run continues from. Rows past it (logged
    after the checkpoint, before a crash) are dropped so every step appears once; earlier rows stay
    and are plotted with the new ones. None: a fresh run, a new file.
    """

    def __init__(self, output_dir: str | Path, resume_step: Optional[int] = None,
                 loggers: Sequence[str] = ("tensorboard",), name: str = "run", project: str = "refine-ray",
                 config: Optional[dict] = None):
        """Open ``<output_dir>/metrics.jsonl`` (rewritten atomically with the kept rows) and start the
        trackers (``name``: the run's name, ``project``: W&B project / MLflow experiment, ``config``:
        the run config as a plain dict). Raises OSError when ``output_dir`` cannot be written,
        ConfigError when a tracker is missing or cannot start."""
        self.dir = Path(output_dir)
        self.name = name
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        self.history: list[dict] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:          # a line cut short by a crash
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resume_step:
                    self.history.append(row)
        self.trackers = open_trackers(loggers, self.dir, name, project, config, resume_step)
        partial = path.with_name("metrics.jsonl.partial")
        partial.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        partial.replace(path)
        self.jsonl = open(path, "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write the metrics of step ``step`` (1-based: after that many training steps; the dict
        ``RefineController.step`` returns) as one JSON line (flushed, so a crash loses at most the
        line being written) and to every tracker."""
        row = {"step": step, **metrics}
        self.history.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def close(self, finished: bool = True) -> None:
        """Close the file and the trackers (``finished``: the run ended normally, else the trackers
        mark it failed) and draw ``summary.png`` when anything was logged."""
        self.jsonl.close()
        for tracker in self.trackers:
            tracker.close(finished)
        if self.history:
            self.plot(self.dir / "summary.png")

    def plot(self, path: Path) -> None:
        """Save :func:`summary_figure` of the logged rows as a PNG at ``path``."""
        import matplotlib.pyplot as plt

        fig = summary_figure(self.history, self.name)
        fig.savefig(path, dpi=100)
        plt.close(fig)


def summary_figure(history: Sequence[dict], name: str):
    """The headline curves of ``history`` (rows with ``step`` and metric keys) against the step: a
    grid of :data:`COLUMNS` labelled panels (:data:`PANELS`, those with data), units on the y axes,
    tick labels written out without offsets. Returns a matplotlib Figure (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator, ScalarFormatter

    present = {key for row in history for key in row}
    panels = [p for p in PANELS if any(key in present for key, _ in p[2])]
    rows, cols = -(-len(panels) // COLUMNS), min(COLUMNS, len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols, 3.0 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_visible(False)
            continue
        title, unit, keys, from_zero = panels[i]
        for key, label in keys:
            pts = [(r["step"], r[key]) for r in history if key in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) <= 40 else None,
                        ms=3, lw=1.2, label=label or key)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_xlabel("step (after N training steps)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if from_zero:
            ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1e-9))
        top = max(abs(v) for v in ax.get_ylim())
        if 1e-3 <= top < 1e6:           # plain decimals, as many as the ticks need; never an offset
            ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        else:                           # tiny or huge: each tick written out (2e-08), no shared factor
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if sum(key in present for key, _ in keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"{name}: {max(r['step'] for r in history)} steps", fontsize=11)
    fig.tight_layout()
    return fig

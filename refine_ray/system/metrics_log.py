"""Where step metrics go: TensorBoard scalars, a JSONL file, and a summary plot at the end."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


class MetricsLogger:
    """``resume_step``: the step a resumed run continues at. Rows of that step and later (logged
    after the checkpoint, before a crash) are dropped so every step appears once; earlier rows
    stay and are plotted with the new ones. None: a fresh run, a new file."""

    def __init__(self, output_dir: str | Path, resume_step: Optional[int] = None):
        """Open ``<output_dir>/tensorboard`` and ``<output_dir>/metrics.jsonl`` (rewritten atomically
        with the kept rows). Raises OSError when ``output_dir`` cannot be written."""
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step)
        path = self.dir / "metrics.jsonl"
        self.history: list[dict] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:          # a line cut short by a crash
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < resume_step:
                    self.history.append(row)
        partial = path.with_name("metrics.jsonl.partial")
        partial.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        partial.replace(path)
        self.jsonl = open(path, "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write one step's metrics (the dict ``RefineController.step`` returns) to TensorBoard and
        as one JSON line (flushed, so a crash loses at most the line being written)."""
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        row = {"step": step, **metrics}
        self.history.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        """Close both sinks and draw ``summary.png`` when anything was logged."""
        self.writer.close()
        self.jsonl.close()
        if self.history:
            self.plot(self.dir / "summary.png")

    def plot(self, path: Path) -> None:
        """One panel per headline metric present (loss terms, training-cut reward, cut entropy,
        unrelated-position hidden cosine, held-out loss, fixed-cut greedy exact match and frozen
        cosine, step seconds) against the step, saved as a PNG at ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [k for k in ("loss", "ntp_loss", "pg_loss", "train_cuts/reward_mean", "cut_entropy",
                              "collapse/hidden_pair_cosine", "val/ntp_loss", "val/nsp_exact_greedy",
                              "val/nsp_cosine_frozen", "time/step_s")
                  if any(k in row for row in self.history)]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
        for ax, key in zip(axes[0], panels):
            pts = [(r["step"], r[key]) for r in self.history if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

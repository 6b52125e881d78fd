"""What a training run leaves for people to look at: `metrics.jsonl` (one line per step and per validation
pass), `loss.png` (train and validation loss against steps) and, when asked, TensorBoard event files.

The JSONL log is the record: the plot and TensorBoard are drawn from the same numbers. On `--resume`, lines
after the checkpoint's step are dropped (those steps run again), so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gemmakit.files import write_atomic, write_text_atomic


class MetricsLog:
    def __init__(self, path: Path, tensorboard: Path | None = None):
        self.path = path
        self.board = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.board = SummaryWriter(str(tensorboard))

    def truncate(self, last_step: int) -> None:
        """Keep only the lines of steps up to `last_step` (resuming from that checkpoint)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= last_step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics: Path, png: Path, title: str = "") -> None:
    """Train loss per step (and its running mean) with validation points, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers, and no GUI backend import
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    k = max(1, len(train) // 20)
    if train:
        ax.plot(*zip(*train, strict=True), lw=0.8 if k > 1 else 1.6, alpha=0.5 if k > 1 else 1.0, label="train loss")
    if k > 1:
        smooth = [sum(v for _, v in train[max(0, i - k + 1):i + 1]) / len(train[max(0, i - k + 1):i + 1])
                  for i in range(len(train))]
        ax.plot([s for s, _ in train], smooth, lw=1.6, label=f"train (mean of {k})")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", lw=1.4, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)

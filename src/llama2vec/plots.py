"""Charts of training logs (log.jsonl written by every training run)."""

from __future__ import annotations

from pathlib import Path

from .errors import Llama2VecError
from .train import read_log


def plot_training_log(run: str | Path, output: str | Path, parts: tuple[str, ...] = ("ebae", "ebar", "lm"),
                      title: str | None = None, smooth: int = 10) -> Path:
    """Plot each loss part of a run against the step (raw and a moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read_log(run)
    if not records:
        raise Llama2VecError(f"{run}: no log.jsonl records to plot")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for part in parts:
        pts = [(r["step"], r[part]) for r in records if part in r]
        if not pts:
            continue
        steps, values = np.array(pts).T
        line, = ax.plot(steps, values, alpha=0.3, linewidth=1)
        if len(values) >= smooth > 1:
            kernel = np.ones(smooth) / smooth
            ax.plot(steps[smooth - 1:], np.convolve(values, kernel, mode="valid"), color=line.get_color(),
                    linewidth=2, label=f"{part.upper()} ({smooth}-step mean)")
        else:
            line.set_alpha(1.0)
            line.set_label(part.upper())
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or f"Training losses: {Path(run).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    return output

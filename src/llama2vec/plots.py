"""Charts of training logs (log.jsonl written by every training run)."""

from __future__ import annotations

from pathlib import Path

from .errors import Llama2VecError
from .store import atomic_file
from .train import read_log


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, output: str | Path) -> Path:
    output = Path(output)
    fig.tight_layout()
    with atomic_file(output) as tmp, tmp.open("wb") as fh:
        fig.savefig(fh, format=output.suffix.lstrip(".") or "png")
    fig.clf()
    return output


def plot_systems(systems: dict[str, dict], output: str | Path,
                 metrics: tuple[str, ...] = ("ndcg@10", "mrr@10")) -> Path:
    """Grouped bars: one group per system, one bar per metric."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
    names = list(systems)
    x = np.arange(len(names))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        values = [systems[n][m] for n in names]
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(0, 1.15)
    ax.set_title("BBC test: metrics by system")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=len(metrics), frameon=False)
    return _save(fig, output)


def plot_label_curve(curve: list[dict], output: str | Path) -> Path:
    """nDCG@10 against the number of training queries, adapted vs unadapted, with spread bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    xs = [max(p["n"], 1) for p in curve]  # n = 0 drawn at 1 on the log axis
    for name in ("unadapted", "adapted"):
        ax.errorbar(xs, [p[name] for p in curve], yerr=[p.get(f"{name}_spread", 0.0) for p in curve],
                    marker="o", capsize=3, label=f"SmolLM2 {name}")
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(p["n"]) for p in curve])
    ax.set_xlabel("training queries (n; 0 = no fine-tuning)")
    ax.set_ylabel("nDCG@10")
    ax.set_title("Where does adaptation pay? BBC test")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, output)


def plot_training_log(run: str | Path, output: str | Path, parts: tuple[str, ...] = ("ebae", "ebar", "lm"),
                      title: str | None = None, smooth: int = 10) -> Path:
    """Plot each loss part of a run against the step (raw and a moving average) as a PNG."""
    import numpy as np

    plt = _pyplot()
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
    return _save(fig, output)

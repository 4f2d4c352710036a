"""The loss curve of a run (train and eval loss against the step) as a PNG, drawn with matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path


def plot_losses(history: list[dict], path: str | Path) -> Path | None:
    """Write the curve of `history` (metrics.jsonl records) to path; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for split, style in (("train", "-"), ("eval", "o-")):
        pts = [(r["step"], r["loss"]) for r in history if r.get("split") == split and "loss" in r]
        if pts:
            ax.plot(*zip(*pts), style, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

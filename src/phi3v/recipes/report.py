"""The nano recipe's reports: a held-out split scored by `phi3v eval --task synth` (JSON + PNG, plus the rate of
rejected-style mistakes), the loss curves of every training phase in one PNG, and the bf16 export that ships."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint.safetensors import save_safetensors
from ..eval.plots import bar_chart
from ..eval.runner import evaluate
from ..eval.tasks import get_task
from .data import rejected_rate


def evaluate_split(model_dir: Path, data_dir: Path, split: str, out_dir: Path, device: str = "cpu", batch: int = 8,
                   max_new_tokens: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Score model_dir on data_dir/split; writes out_dir/report.json and report.png; returns the summary
    {overall, categories, n, rejected}."""
    from ..api import load  # the API room is below recipes; imported here to keep module import light

    model = load(model_dir, dtype="float32", device=device)
    task = get_task("synth")
    items = task.load(data_dir, split)
    rep = evaluate(model, task, items, batch=batch, max_new_tokens=max_new_tokens, progress=progress)
    rep["rejected_style"] = rejected_rate(rep, Path(data_dir) / split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(rep, indent=1))
    bar_chart(rep, out_dir / "report.png")
    kinds: dict[str, list[float]] = {}
    for row in rep["items"]:
        kinds.setdefault(row["meta"].get("kind", ""), []).append(row["score"])
    return {"overall": rep["overall"], "categories": rep["categories"], "n": rep["n"],
            "kinds": {k: sum(v) / len(v) for k, v in sorted(kinds.items())}, "rejected": rep["rejected_style"]}


def plot_recipe_losses(metrics: dict[str, Path], path: Path) -> Path | None:
    """Train (line) and eval (dots) loss of each phase, the phases one after the other on the step axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    offset = 0
    for phase, file in metrics.items():
        if not Path(file).is_file():
            continue
        rows = [json.loads(ln) for ln in Path(file).read_text().splitlines() if ln.strip()]
        train = [(offset + r["step"], r["loss"]) for r in rows if r.get("split") == "train" and "loss" in r]
        evals = [(offset + r["step"], r["loss"]) for r in rows if r.get("split") == "eval" and "loss" in r]
        if train:
            line, = ax.plot(*zip(*train), "-", label=f"{phase} train")
            if evals:
                ax.plot(*zip(*evals), "o", color=line.get_color(), label=f"{phase} val")
            offset = train[-1][0]
    ax.set_xlabel("optimizer step (phases in order)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def export_bf16(src: Path, dst: Path, files: tuple[str, ...]) -> Path:
    """dst = src's checkpoint with its weights in bfloat16 (config torch_dtype too) and the given side files."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True, exist_ok=True)
    state = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        state.update({k: v.to(torch.bfloat16) for k, v in load_file(f).items()})
    save_safetensors(state, dst, 1 << 40)
    for name in files:
        if (src / name).is_file() and name != "config.json":
            (dst / name).write_bytes((src / name).read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst

"""Training checkpoints, written atomically: a temporary folder is filled and fsynced, then renamed.

`OUT/checkpoints/step-00000040/` holds model.safetensors (every weight, or the trainable ones only), optimizer.pt,
state.pt (scheduler, loader position, micro-step, step) and rng-R.pt (torch, CUDA, python, numpy RNG of rank R;
one file per rank). A folder appears under its final name only once complete, so a run killed while writing
leaves a `.tmp-*` folder that `latest_checkpoint` ignores and the next save removes.

Under torchrun every rank calls save and load: FSDP2 shards (weights and AdamW moments) are gathered into full
tensors, so the files are the same whatever the number of ranks; rank 0 writes them, every rank's RNG included.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from phi3v.checkpoint.safetensors import SafetensorsFile, save_file
from phi3v.errors import CheckpointError

from .distributed import barrier, full_tensor, gather_objects, rank_and_world, shard_like

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
TMP = ".tmp-"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_state(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: all of the state dict, or only the parameters that require grad."""
    if trainable_only:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach() for n, t in model.state_dict().items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with FSDP2-sharded moments gathered into full tensors (a collective under FSDP2)."""
    state = optimizer.state_dict()
    for idx in sorted(state["state"]):
        state["state"][idx] = {k: full_tensor(v) for k, v in state["state"][idx].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state saved by `optimizer_state`, splitting each moment as its (FSDP2-sharded) parameter is."""
    params = [p for g in optimizer.param_groups for p in g["params"]]  # state_dict ids count in this order
    for idx, st in state["state"].items():
        p = params[idx]
        st.update({k: shard_like(v, p) for k, v in st.items() if torch.is_tensor(v) and v.shape == p.shape})
    optimizer.load_state_dict(state)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: str | Path, step: int, *, model, optimizer, scheduler=None, loader_state: dict,
                    micro_step: int = 0, trainable_only: bool = False, extra: dict | None = None,
                    keep: int | None = 2) -> Path:
    """Write the checkpoint of `step` and return its folder; older ones beyond the last `keep` are removed.
    Under torchrun every rank calls it (the gathers are collectives) and rank 0 writes."""
    weights = {k: full_tensor(v).contiguous().cpu() for k, v in model_state(model, trainable_only).items()}
    optim, rngs = optimizer_state(optimizer), gather_objects(rng_state())
    root = Path(out_dir) / CHECKPOINTS
    final = root / f"{PREFIX}{step:08d}"
    if rank_and_world()[0] == 0:
        _write(root, final, weights, optim, rngs, keep, step=step, micro_step=micro_step, loader=loader_state,
               trainable_only=trainable_only, scheduler=scheduler.state_dict() if scheduler is not None else None,
               extra=extra or {})
    barrier()  # no rank runs on (or is killed) before the checkpoint is complete
    return final


def _write(root: Path, final: Path, weights: dict, optim: dict, rngs: list, keep: int | None, **state) -> None:
    """Fill a temporary folder, fsync it and rename it to `final`; prune to the last `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(TMP + "*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{TMP}{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    torch.save(optim, tmp / "optimizer.pt")
    torch.save({**state, "world": len(rngs)}, tmp / "state.pt")
    for r, rng in enumerate(rngs):
        torch.save(rng, tmp / f"rng-{r}.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": state["step"], "trainable_only": state["trainable_only"],
                                               "world": len(rngs)}))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (a resumed run): the new copy replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    if keep:
        for old in list_checkpoints(root.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are never listed)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler=None, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and RNG (of `rank`) from a checkpoint folder into a plain or
    FSDP2-sharded model; returns its state (step, micro_step, loader, extra) for the caller to restore the loader."""
    path = Path(path)
    files = [path / "model.safetensors", path / "optimizer.pt", path / "state.pt", path / f"rng-{rank}.pt"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: delete the folder to resume from the "
                              "one before it (or resume with as many ranks as wrote it)")
    st = SafetensorsFile(files[0])
    weights = {k: st.get(k) for k in st.keys()}
    state = torch.load(files[2], weights_only=False)
    own = model_state(model, state["trainable_only"])
    if set(weights) != set(own):
        raise CheckpointError(f"checkpoint {path} holds other weights than this model ({len(weights)} vs {len(own)} "
                              "tensors): resume with the same model and adapter settings")
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(shard_like(weights[name], t))
    load_optimizer_state(optimizer, torch.load(files[1], weights_only=False))
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(torch.load(files[3], weights_only=False))
    return state

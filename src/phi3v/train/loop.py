"""The one training loop: SFT, pretraining and DPO differ only in the loss plug-in and the batches.

`train(model, loss_fn, batches, optimizer, scheduler, ...)` runs optimizer steps of `grad_accum` micro-batches:
each micro-batch's summed loss is backpropagated, the gradients are divided by the units (tokens, pairs) of the
whole step, clipped, and applied. The caller's `on_step(step, record)` sees every step and does the rest (logging,
evaluation, checkpoints), so the loop holds no file or output logic.

Under torchrun `model` is DDP or FSDP2 around a LossModule (phi3v.train.distributed): they average the gradients
over the ranks, and the loop divides by the all-reduced units instead, so a step weighs what it would in one process
with the same global batch. A rank's empty share (a StandIn batch) runs with weight 0 to keep the collectives paired.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch

from phi3v.data.loader import StandIn

from .distributed import all_reduce_sum, full_tensor, rank_and_world, sync_grads

__all__ = ["autocast_context", "autocast_dtype", "evaluate", "make_optimizer", "rank_and_world", "train", "warmup_cosine"]


def autocast_dtype(device: torch.device, setting: str = "auto") -> torch.dtype | None:
    """bfloat16 autocast where the device computes it natively ("auto"), always ("bf16") or never ("off")."""
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") else None
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to dtype on the device, or a no-op context when dtype is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine from 1 to min_ratio at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def make_optimizer(groups: list[dict], lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW over param groups ({"params", "lr", "name"}); matrices decay, vectors (norms, biases) do not.
    Parameters that get no gradient in a step (frozen by a stage, unused) are left alone by AdamW."""
    out = []
    for g in groups:
        params = list(g["params"])
        decay = [p for p in params if p.ndim >= 2]
        flat = [p for p in params if p.ndim < 2]
        for ps, wd, suffix in ((decay, weight_decay, ""), (flat, 0.0, "/no_decay")):
            if ps:
                out.append({"params": ps, "lr": g.get("lr", lr), "weight_decay": wd, "name": g["name"] + suffix})
    return torch.optim.AdamW(out, lr=lr, betas=betas, eps=eps)


def train(model: torch.nn.Module, loss_fn, batches: Iterable, optimizer: torch.optim.Optimizer, scheduler=None, *,
          steps: int, start_step: int = 0, grad_accum: int = 1, max_grad_norm: float | None = 1.0,
          device: torch.device | str = "cpu", autocast: torch.dtype | None = None,
          before_step: Callable[[int], None] | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run optimizer steps start_step+1 .. steps; `loss_fn(model, batch) -> LossOutput`. `before_step(step)` may
    change what is trainable (pretraining stages); `on_step(step, record)` gets each step's metrics. Returns the
    last record."""
    device = torch.device(device)
    _, world = rank_and_world()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    it = iter(batches)
    record: dict = {}
    for step in range(start_step, steps):
        if before_step is not None:
            before_step(step)
        model.train()
        t0 = time.perf_counter()
        units, tokens, sums = 0, 0, {}
        for micro in range(grad_accum):
            batch = next(it).to(device)
            weight = 0 if isinstance(batch, StandIn) else 1  # a rank's empty share: run it, so collectives match
            batch = getattr(batch, "batch", batch)
            with sync_grads(model, micro == grad_accum - 1):
                with autocast_context(device, autocast):
                    out = loss_fn(model, batch)
                (out.total if weight else out.total * 0).backward()
            units += out.units * weight
            tokens += int(batch.attention_mask.sum()) * weight
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v * weight
        # the mean over the units of the whole global step: DDP/FSDP averaged the gradients over `world` ranks
        units, tokens, *totals = all_reduce_sum([units, tokens, *sums.values()])
        sums = dict(zip(sums, totals))
        scale = world / max(units, 1)
        for p in params:
            if p.grad is not None and not p.requires_grad:  # frozen by a stage after a wrapper computed it
                p.grad = None
            if p.grad is not None:
                p.grad.mul_(scale)
        grads = [p for p in params if p.grad is not None]
        if max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(grads, max_grad_norm)
        elif world > 1:
            norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        record = {"step": step + 1, "split": "train", **{k: v / max(units, 1) for k, v in sums.items()},
                  "lr": lr, "grad_norm": float(full_tensor(norm)), "tokens": int(tokens),
                  "tokens_per_s": tokens / max(elapsed, 1e-9)}
        if on_step is not None:
            on_step(step + 1, record)
    return record


@torch.no_grad()
def evaluate(model: torch.nn.Module, loss_fn, batches: Iterable, device: torch.device | str = "cpu",
             autocast: torch.dtype | None = None) -> dict:
    """Mean loss (and metrics) of loss_fn over the batches, in eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    units, sums = 0, {}
    for batch in batches:
        batch = batch.to(device)
        with autocast_context(device, autocast):
            out = loss_fn(model, batch)
        units += out.units
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    model.train(was_training)
    return {k: v / max(units, 1) for k, v in sums.items()}

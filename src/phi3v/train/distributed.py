"""Data parallelism under torchrun: the process group, DDP or FSDP2 around the model and its loss, and the few
collectives the recipe itself needs (the step's unit count, full tensors of sharded weights, every rank's RNG).

The loss plug-ins call the model's parts (embed_tokens, layers, lm_head), never `model.forward`, so DDP and FSDP2
wrap a `LossModule` whose forward is the loss: then every training forward passes through their hooks. DDP and
FSDP2 average gradients over the ranks; the loop undoes that mean and divides by the all-reduced units instead.
"""

from __future__ import annotations

import atexit
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from phi3v.errors import InputError

MODES = ("ddp", "fsdp")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when a process group is initialised (torchrun), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str) -> torch.device:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU) and return this rank's device
    (cuda -> cuda:LOCAL_RANK); a single process gets `device` unchanged."""
    dev = torch.device(device)
    if launched_world() <= 1:
        return dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return dev


class LossModule(nn.Module):
    """The model and its loss plug-in as one module: `forward(batch) -> LossOutput`."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def call_loss(module: nn.Module, batch):
    """The loss function of a wrapped LossModule, for the loop: the wrapper's forward is the loss."""
    return module(batch)


def wrap(model: nn.Module, loss_fn, mode: str, device: torch.device, find_unused: bool = False) -> nn.Module:
    """DDP or FSDP2 around LossModule(model, loss_fn). FSDP2 shards each decoder layer, the vision tower, and the rest
    (embeddings, projector, norm, LM head) as the root unit; frozen parameters (LoRA, stages) may sit in any unit.
    `find_unused`: DDP tolerates parameters without a gradient in a step (text-only batches, frozen stages)."""
    if mode not in MODES:
        raise InputError(f"unknown --distributed {mode!r}: one of {MODES}")
    module = LossModule(model, loss_fn)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused,
                                       broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    tower = getattr(getattr(model.model, "vision_embed_tokens", None), "img_processor", None)
    if tower is not None:
        fully_shard(tower, mesh=mesh)
    return fully_shard(module, mesh=mesh)


def sync_grads(module: nn.Module, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only when `sync` (the step's last
    micro-batch); the others accumulate locally."""
    if hasattr(module, "no_sync"):  # DDP
        return nullcontext() if sync else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)
    return nullcontext()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums over the ranks of a few numbers (float64, on the process group's device); unchanged in one process."""
    _, world = rank_and_world()
    if world == 1:
        return values
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` split as the FSDP2 shard `like` is (a DTensor with its mesh and placements), or `full` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


def materialize(wrapped: nn.Module) -> None:
    """Replace every FSDP2-sharded parameter under `wrapped` (as `wrap` returned it) by its full tensor, in place,
    for the export at the end of training (a collective; nothing may run forward afterwards)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in wrapped.modules():  # a unit left unsharded by a forward (the root, after an eval) would swap
        if isinstance(module, FSDPModule):  # its shards back in on state_dict(): reshard every unit first
            module.reshard()
    for module in wrapped.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                module._parameters[name] = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in one process."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


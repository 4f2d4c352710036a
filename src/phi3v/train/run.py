"""The recipe: a TrainConfig in, a trained Hugging Face checkpoint folder out. Composes the pieces (records,
collator, loader, loss plug-in, the one loop, checkpoints, export); `prepare` loads, `fit` trains."""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from phi3v.checkpoint.hub import resolve_model_dir
from phi3v.checkpoint.load import load_causal_lm, parse_dtype
from phi3v.data.collate import Encoder, collate
from phi3v.data.loader import Loader
from phi3v.data.records import BadRecords, read_records
from phi3v.errors import InputError
from phi3v.models import config_from_dict, is_vision_config
from phi3v.models.config import read_json
from phi3v.processing.image import ImageProcessor
from phi3v.processing.tokenizer import Tokenizer

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import barrier, call_loss, init_distributed, materialize, rank_and_world, wrap
from .dpo import collate_pairs, encode_pairs
from .export import export_hf
from .loop import autocast_dtype, evaluate, make_optimizer, train, warmup_cosine
from .losses import next_token_loss
from .lora import lora_layers
from .plot import plot_losses
from .tuning import attach_adapters, finish_adapters, make_dpo_loss

METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"
RECORD_KIND = {"sft": "conversation", "pretrain": "caption", "dpo": "preference"}  # task -> records it reads
TOWER, PROJECTOR = "model.vision_embed_tokens.img_processor.", "model.vision_embed_tokens."


def lm_loss(setup: Setup):
    return functools.partial(next_token_loss, aux_coef=setup.aux_coef,
                             checkpointing=setup.cfg.activation_checkpointing)


LOSSES: dict[str, Callable] = {"sft": lm_loss, "pretrain": lm_loss,  # task -> (setup -> loss_fn(model, batch))
                               "dpo": make_dpo_loss}


def part_of(name: str) -> str:
    """tower / projector / decoder: which part of the model a parameter belongs to."""
    if name.startswith(TOWER):
        return "tower"
    return "projector" if name.startswith(PROJECTOR) else "decoder"


@dataclass
class Setup:
    cfg: TrainConfig
    model_dir: Path
    raw: dict
    model: torch.nn.Module
    encoder: Encoder
    samples: list
    eval_samples: list
    bad: BadRecords
    records_read: int
    aux_coef: float = 0.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def pad_id(self) -> int:
        tok = self.encoder.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def collate(self, samples: list):
        fn = collate_pairs if self.cfg.task == "dpo" else collate  # dpo: PairSamples -> chosen and rejected rows
        return fn(samples, self.pad_id, self.encoder.processor, self.encoder.num_crops)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg: TrainConfig) -> Setup:
    """Load the checkpoint and read and encode the data (bad records collected in setup.bad, or raised)."""
    cfg.check()
    model_dir = resolve_model_dir(cfg.model)
    raw = read_json(model_dir / "config.json", "config.json")
    mcfg = config_from_dict(raw)
    device = init_distributed(cfg.device)  # under torchrun: joins the process group, cuda -> cuda:LOCAL_RANK
    model = load_causal_lm(model_dir, mcfg, parse_dtype(cfg.dtype), device, raw=raw)
    attach_adapters(model, cfg)  # --lora-r / --qlora: only adapters train
    tokenizer = Tokenizer.from_dir(model_dir)
    processor = ImageProcessor.from_dir(model_dir) if is_vision_config(raw) else None
    encoder = Encoder(tokenizer, processor, cfg.num_crops if processor is not None else None, cfg.max_length)
    bad = BadRecords(cfg.on_bad_record)
    kind = RECORD_KIND.get(cfg.task, "conversation")
    records, read = read_records(cfg.data, kind, bad)
    encode = encoder.encode_all if cfg.task != "dpo" else functools.partial(encode_pairs, encoder)
    samples = encode(records, bad)
    eval_samples = []
    if cfg.eval_data:
        eval_records, n = read_records(cfg.eval_data, kind, bad)
        more = {"start": len(samples)} if cfg.task == "dpo" else {}  # pair indices run on (precomputed references)
        eval_samples, read = encode(eval_records, bad, **more), read + n
    coef = float(raw.get("router_aux_loss_coef", 0.001)) if raw.get("num_local_experts") else 0.0
    return Setup(cfg, model_dir, raw, model, encoder, samples, eval_samples, bad, read, coef, device)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    lrs = {"tower": cfg.lr_tower or cfg.lr, "projector": cfg.lr_projector or cfg.lr, "decoder": cfg.lr}
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:  # all of them, except under adapters
            groups.setdefault(part_of(name), []).append(p)
    return [{"name": part, "params": ps, "lr": lrs[part]} for part, ps in groups.items()]


def stage_switch(model: torch.nn.Module, cfg: TrainConfig) -> Callable[[int], None] | None:
    """before_step for pretraining stages: freeze the parts a step's stage does not train (the last stage lasts)."""
    if not cfg.stages:
        return None
    named = [(part_of(n), p) for n, p in model.named_parameters() if p.requires_grad]
    bounds = np.cumsum([s.steps for s in cfg.stages])

    def before(step: int) -> None:
        stage = cfg.stages[min(int(np.searchsorted(bounds, step, side="right")), len(cfg.stages) - 1)]
        for part, p in named:
            p.requires_grad_(part in stage.train)
    return before


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _keep_until(path: Path, step: int) -> None:
    """Drop metrics a killed run logged after its last checkpoint: the resumed run logs them again."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


@dataclass
class RunResult:
    out: Path
    steps: int
    last: dict
    resumed_from: Path | None
    history: list[dict]


def fit(setup: Setup, progress: Callable[[dict], None] | None = None) -> RunResult:
    """Train, checkpoint, evaluate and export as setup.cfg says; `progress(record)` sees every train/eval record
    (with "total_steps"). Resumes from the latest complete checkpoint in cfg.out when cfg.resume. Under torchrun
    every rank calls it: rank 0 writes the metrics, checkpoints and the export, and alone calls `progress`."""
    cfg, model = setup.cfg, setup.model
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = rank_and_world()
    lead = rank == 0
    seed_everything(cfg.seed)
    loader = Loader(setup.samples, cfg.batch, setup.collate, seed=cfg.seed, rank=rank, world=world)
    steps = cfg.steps or max(1, math.ceil((cfg.epochs or 1) * loader.batches_per_epoch / cfg.grad_accum))
    adapters = bool(lora_layers(model))
    if not adapters:
        for p in model.parameters():
            p.requires_grad_(True)
    loss_fn = LOSSES[cfg.task](setup)  # before a resumed checkpoint is loaded (DPO: the model is the reference)
    metrics = out / METRICS
    resumed = latest_checkpoint(out) if cfg.resume else None
    if resumed is None and latest_checkpoint(out) is not None:  # a fresh run would mix its checkpoints with another's
        raise InputError(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, or another --out")
    wrapped, step_loss = model, loss_fn
    if world > 1:  # DDP / FSDP2 around the model and its loss; FSDP2 swaps in sharded parameters
        vision = getattr(model.model, "vision_embed_tokens", None) is not None
        wrapped = wrap(model, loss_fn, cfg.distributed or "ddp", setup.device, find_unused=vision or bool(cfg.stages))
        step_loss = call_loss
    optimizer = make_optimizer(param_groups(model, cfg), cfg.lr, cfg.weight_decay)  # after FSDP2's swap
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup, steps, cfg.min_lr_ratio))
    start = 0
    if resumed is not None:
        state = load_checkpoint(resumed, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank)
        loader.load_state_dict(state["loader"])
        start = state["step"]
        if lead:
            _keep_until(metrics, start)
    elif lead:
        metrics.write_text("")
    if lead:
        (out / "train_config.json").write_text(json.dumps(setup.cfg.to_dict(), indent=2))
    amp = autocast_dtype(setup.device, cfg.autocast)

    def report(record: dict) -> None:
        if progress is not None and lead:
            progress({**record, "total_steps": steps})

    def run_eval(step: int) -> None:
        if not setup.eval_samples:
            return
        batches = (setup.collate(setup.eval_samples[i:i + cfg.batch])  # every rank: all of them (FSDP2 needs it)
                   for i in range(0, len(setup.eval_samples), cfg.batch))
        record = {"step": step, "split": "eval", **evaluate(wrapped, step_loss, batches, setup.device, amp)}
        if lead:
            _append(metrics, record)
        report(record)

    def on_step(step: int, record: dict) -> None:
        if lead and (step % cfg.log_every == 0 or step == steps):
            _append(metrics, record)
        report(record)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
            run_eval(step)
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(out, step, model=model, optimizer=optimizer, scheduler=scheduler,
                            loader_state=loader.state_dict(), keep=cfg.keep_checkpoints,
                            extra={"task": cfg.task}, trainable_only=adapters)

    last = train(wrapped, step_loss, loader, optimizer, scheduler, steps=steps, start_step=start,
                 grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm or None, device=setup.device,
                 autocast=amp, before_step=stage_switch(model, cfg), on_step=on_step)
    run_eval(steps)
    history: list[dict] = []
    if world > 1:
        materialize(wrapped)  # FSDP2 shards -> full weights on every rank (a collective)
    if lead:
        export_dtype = parse_dtype(cfg.export_dtype) if cfg.export_dtype else None
        num_crops = setup.encoder.num_crops if setup.encoder.vision else None
        final = finish_adapters(model, out, setup.model_dir)  # OUT/adapter; merged for the export (None: QLoRA)
        if final is not None:
            export_hf(final, setup.raw, setup.model_dir, out, num_crops=num_crops, dtype=export_dtype)
        history = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        plot_losses(history, out / LOSS_PNG)
    barrier()  # the export is complete when any rank returns
    return RunResult(out, steps, last, resumed, history)

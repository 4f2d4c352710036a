"""TrainConfig: every setting of a training run. Its fields are the `phi3v train` flags (the CLI generates them),
and the keys of a TOML or YAML config file (`--config FILE`); explicit flags override the file."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from phi3v.errors import InputError

TASKS = ["sft", "pretrain", "dpo"]
LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # the decoder's linears (phi3v.train.lora)
PARTS = ("tower", "projector", "decoder")  # what pretraining stages freeze or train


def opt(default, help: str, **argparse_kw):
    """A TrainConfig field with its CLI help (and argparse extras such as choices or nargs)."""
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, **argparse_kw}, **kw)


@dataclass
class Stage:
    """Train these parts (the others frozen) for `steps` optimizer steps."""

    steps: int
    train: tuple[str, ...]


def parse_stages(value) -> list[Stage]:
    """Stages from "projector:10,projector+decoder:40" or a list of {"steps", "train"} (a config file's)."""
    if not value:
        return []
    items = value if isinstance(value, list) else [s for s in str(value).split(",") if s.strip()]
    out = []
    for item in items:
        if isinstance(item, Stage):
            out.append(item)
            continue
        if isinstance(item, dict):
            parts, steps = item.get("train"), item.get("steps")
            parts = [parts] if isinstance(parts, str) else parts
        else:
            spec, _, steps = item.strip().rpartition(":")
            parts = spec.split("+")
        try:
            steps = int(steps)
        except (TypeError, ValueError):
            raise InputError(f"stage {item!r}: steps must be an integer, as in 'projector:10'") from None
        bad = [p for p in parts or [] if p not in PARTS]
        if not parts or bad or steps < 1:
            raise InputError(f"stage {item!r}: train one or more of {PARTS} for >= 1 steps, as in 'projector:10'")
        out.append(Stage(steps, tuple(parts)))
    return out


@dataclass
class TrainConfig:
    task: str = opt("sft", "what to train: the loss and the records it reads", choices=TASKS)
    model: str | None = opt(None, "checkpoint folder to start from")
    data: str | None = opt(None, "training JSONL (conversations for sft, image-caption pairs for pretrain)")
    eval_data: str | None = opt(None, "held-out JSONL of the same kind, evaluated every --eval-every steps")
    out: str = opt("train-out", "output folder: checkpoints, metrics.jsonl, loss.png, the final model")
    steps: int | None = opt(None, "optimizer steps (default: --epochs over the data)", type=int)
    epochs: float | None = opt(None, "passes over the data when --steps is not given (default 1)", type=float)
    batch: int = opt(4, "samples per micro-batch", type=int)
    grad_accum: int = opt(1, "micro-batches per optimizer step", type=int)
    lr: float = opt(2e-5, "peak learning rate (AdamW)", type=float)
    lr_tower: float | None = opt(None, "learning rate of the vision tower (default --lr)", type=float)
    lr_projector: float | None = opt(None, "learning rate of the image projector (default --lr)", type=float)
    warmup: int = opt(0, "linear warm-up steps before the cosine decay", type=int)
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak", type=float)
    weight_decay: float = opt(0.0, "AdamW weight decay of matrices", type=float)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)", type=float)
    max_length: int = opt(2048, "longest sample in tokens; longer records are bad records", type=int)
    num_crops: int | None = opt(None, "HD crops per image, 1..16 (default: the checkpoint's processor)", type=int)
    stages: list = opt(list, "pretraining stages, e.g. projector:20,projector+decoder:80 (parts: tower, "
                       "projector, decoder); default: train every part")
    save_every: int = opt(0, "write a checkpoint every K steps (0: only at the end)", type=int)
    keep_checkpoints: int = opt(2, "checkpoints kept in OUT/checkpoints", type=int)
    eval_every: int = opt(0, "evaluate --eval-data every K steps (0: only at the end)", type=int)
    log_every: int = opt(1, "write a metrics.jsonl line every K steps", type=int)
    seed: int = opt(0, "seed of the data order and of every RNG", type=int)
    resume: bool = opt(False, "continue from the latest complete checkpoint in --out", action="store_true")
    on_bad_record: str = opt("skip", "what a bad record does: skip it (reported) or stop", choices=["skip", "error"])
    dtype: str = opt("float32", "weight dtype while training (float32 recommended; bf16 autocast is separate)")
    device: str = opt("cpu", "cpu, cuda, cuda:1, ...")
    autocast: str = opt("auto", "bf16 autocast: auto (where the device has native bf16), bf16, off",
                        choices=["auto", "bf16", "off"])
    distributed: str | None = opt(None, "under torchrun: ddp (replicas) or fsdp (FSDP2 shards per decoder layer and "
                                  "the vision tower); default ddp", choices=["ddp", "fsdp"])
    activation_checkpointing: bool = opt(False, "recompute decoder layers in backward (less memory)",
                                         action="store_true")
    export_dtype: str | None = opt(None, "dtype of the exported model (default: the training dtype)")
    lora_r: int = opt(0, "LoRA rank: train adapters only (0: full fine-tuning)", type=int)
    lora_alpha: float = opt(16.0, "LoRA alpha (the update is scaled by alpha / r)", type=float)
    lora_dropout: float = opt(0.0, "dropout on the adapters' input", type=float)
    lora_targets: list = opt(lambda: list(LORA_TARGETS), "modules to adapt: qkv_proj o_proj gate_up_proj down_proj "
                             "img_projection q_proj k_proj v_proj out_proj fc1 fc2 (CLIP), or full module names "
                             "(default: the decoder's four)", nargs="+")
    qlora: str | None = opt(None, "QLoRA: quantize the adapted layers to int4 or int8 (frozen) under the adapters",
                            choices=["int4", "int8"])
    qlora_group_size: int = opt(128, "int4 group size for --qlora int4", type=int, choices=[32, 64, 128])
    beta: float = opt(0.1, "DPO beta: how far the policy may move from the reference", type=float)
    dpo_loss: str = opt("sigmoid", "DPO loss as TRL defines it", choices=["sigmoid", "ipo", "hinge", "robust"])
    label_smoothing: float = opt(0.0, "DPO label smoothing in [0, 0.5) (sigmoid and robust)", type=float)
    sft_weight: float = opt(0.0, "weight of an SFT term on the chosen answers in DPO (0: none)", type=float)
    ref: str | None = opt(None, "DPO reference log-probs: adapters (the base with adapters off; default with "
                          "--lora-r), copy (a frozen copy; default otherwise) or precomputed (once, to OUT)",
                          choices=["adapters", "copy", "precomputed"])

    def __post_init__(self):
        self.stages = parse_stages(self.stages)

    def check(self) -> TrainConfig:
        """Raise InputError for settings that cannot run; returns self."""
        if not self.model or not self.data:
            raise InputError("training needs --model DIR and --data FILE (or `model` and `data` in --config)")
        if self.task not in TASKS:
            raise InputError(f"unknown task {self.task!r}; one of {TASKS}")
        for name in ("batch", "grad_accum", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps must be at least 1, got {self.steps}")
        if self.steps is not None and self.epochs is not None:
            raise InputError("give --steps or --epochs, not both")
        if self.stages and self.task != "pretrain":
            raise InputError("--stages are for pretrain")
        if self.lora_r < 0 or (self.qlora and not self.lora_r):
            raise InputError("--qlora trains adapters: give a positive --lora-r too" if self.qlora
                             else f"--lora-r must be positive (or 0 for full fine-tuning), got {self.lora_r}")
        if self.lora_r and self.stages:
            raise InputError("--stages pick which parts train; with --lora-r only the adapters train: use one of them")
        if self.lora_r and not self.lora_targets:
            raise InputError("--lora-targets needs at least one module name, e.g. qkv_proj o_proj")
        if self.distributed not in (None, "ddp", "fsdp"):
            raise InputError(f"--distributed must be ddp or fsdp, got {self.distributed!r}")
        if self.distributed == "fsdp" and self.qlora:
            raise InputError("--qlora keeps integer weights that FSDP2 cannot shard: use --distributed ddp")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = [{"steps": s.steps, "train": list(s.train)} for s in self.stages]
        return d

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> TrainConfig:
        """Settings from a .toml, .yaml/.yml or .json file (keys = field names, dashes allowed), then overrides."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".toml":
                d = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                d = yaml.safe_load(text) or {}
            elif path.suffix == ".json":
                d = json.loads(text)
            else:
                raise InputError(f"config file {path} must end in .toml, .yaml, .yml or .json")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"config file {path} is not valid: {e}") from e
        except Exception as e:  # yaml.YAMLError, without importing yaml for TOML users
            if type(e).__module__.startswith("yaml"):
                raise InputError(f"config file {path} is not valid YAML: {e}") from e
            raise
        if not isinstance(d, dict):
            raise InputError(f"config file {path} must hold a table of settings")
        d = {k.replace("-", "_"): v for k, v in d.items()}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"config file {path}: unknown setting(s) {unknown}; known: {sorted(names)}")
        return cls(**{**d, **overrides})

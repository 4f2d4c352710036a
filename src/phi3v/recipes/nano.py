"""`phi3v recipe nano`: synthetic data -> a random nano Phi-3-Vision -> pretraining (captions, transcriptions) -> SFT
-> DPO -> evaluation on test and test-novel, in a time budget. Every phase writes its result under OUT and is marked
done in OUT/recipe.json, so a killed run continues with `resume=True` (a phase in flight resumes from its last
checkpoint, with the step count it was planned with)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint.files import TOKENIZER_FILES, copy_tokenizer_files
from ..checkpoint.random import RANDOM_MARKER, Sizes, create_random
from ..data.synth import SynthConfig, generate
from ..errors import InputError
from ..hardware import cpu_bf16_matmul
from ..models.config import read_json
from ..train.config import TrainConfig
from ..train.loop import autocast_context, autocast_dtype
from ..train.run import LOSSES, fit, prepare
from .data import write_training_files
from .report import evaluate_split, export_bf16, plot_recipe_losses

# The nano architecture: the Phi-3 tokenizer's 32064-token vocabulary dominates the size (2 x 32064 x 128 weights for
# embed_tokens and lm_head, untied); a 4-layer decoder; a 3-layer CLIP on 80 px crops of 5 px patches, so a glyph of
# the nano images' 9-11 px cap height spans about two patches and one merged (2x2) token, and a crop is 8x8 tokens.
NANO_SIZES = Sizes(layers=4, hidden=128, heads=4, kv_heads=4, intermediate=512, vision_layers=3, vision_hidden=128,
                   vision_heads=4, vision_intermediate=512, vision_image_size=80, vision_patch_size=5)
NANO_NUM_CROPS = 9  # a 224-288 px landscape image fills 3 crops across (240 px): no down-scaling, aspect kept
NANO_SYNTH = SynthConfig(min_side=224, max_side=288, min_cap_px=9, max_cap_px=11, max_items=4)
NAME = "phi3v-nano"
STATE = "recipe.json"
PHASES = ("data", "init", "pretrain", "sft", "eval-sft", "dpo", "final", "eval")
TRAINED = ("pretrain", "sft", "dpo")

Progress = Callable[[str, int, int, dict], None]  # (phase, done, total, info)


def default_like() -> Path:
    """Where the tokenizer, chat template and base config come from: the Phi-3.5-vision reference, else the
    shipped nano (which carries the same files)."""
    here = Path(__file__).resolve()
    for p in (here.parents[3].parent / "shared" / "reference" / "Phi-3.5-vision-instruct",
              here.parents[1] / "assets" / NAME):
        if (p / "config.json").is_file() and (p / "tokenizer.json").is_file():
            return p
    raise InputError("no Phi-3-vision config and tokenizer to start from: pass like=<folder with config.json and "
                     "tokenizer.json> (e.g. a Phi-3.5-vision-instruct download)")


@dataclass
class NanoPlan:
    """Everything the recipe decides; the defaults are the shipped nano's."""

    sizes: Sizes = NANO_SIZES
    num_crops: int = NANO_NUM_CROPS
    synth: SynthConfig = NANO_SYNTH
    train_images: int = 8000
    eval_images: int = 60  # per held-out split (test, test-novel); val gets eval_images // 2
    share: dict = field(default_factory=lambda: {"pretrain": 0.40, "sft": 0.42, "dpo": 0.08, "eval": 0.05})
    batch: int = 8
    lr: dict = field(default_factory=lambda: {"pretrain": 2e-3, "sft": 1e-3, "dpo": 5e-5})
    min_steps: int = 2
    max_steps: int = 100_000
    steps: dict = field(default_factory=dict)  # phase -> fixed step count (else timed from the budget): reruns a run
    eval_batch: int = 8
    eval_max_new_tokens: int | None = None  # None: the synth task's per-answer budget
    # bf16 autocast: "fastest" times one batch with and without it where the device has native bf16 (CUDA, a CPU with
    # avx512_bf16 / amx_bf16) and keeps the faster (recorded in recipe.json; a resumed run keeps it), or "bf16", "off"
    autocast: str = "fastest"


class Recipe:
    """One run of the recipe in OUT; `run()` does the phases not yet marked done."""

    def __init__(self, out, device: str = "cpu", budget_minutes: float = 110, seed: int = 0, resume: bool = False,
                 plan: NanoPlan | None = None, like=None, progress: Progress | None = None):
        if budget_minutes <= 0:
            raise InputError(f"budget_minutes must be positive, got {budget_minutes}")
        self.out, self.device, self.seed = Path(out), device, seed
        self.plan, self.progress = plan or NanoPlan(), progress or (lambda *a: None)
        if self.plan.autocast not in ("fastest", "bf16", "off"):
            raise InputError(f"NanoPlan.autocast must be fastest, bf16 or off, got {self.plan.autocast!r}")
        self.like = Path(like) if like is not None else default_like()
        state_file = self.out / STATE
        if state_file.is_file() and not resume:
            raise InputError(f"{self.out} holds a recipe run already: pass --resume to continue it, or a new --out")
        if resume and state_file.is_file():
            self.state = read_json(state_file, STATE)
        else:
            self.state = {"name": NAME, "seed": seed, "device": device, "budget_minutes": budget_minutes,
                          "done": [], "steps": {}, "minutes": {}, "plan": _plan_dict(self.plan)}
        self.budget_s = 60 * float(self.state["budget_minutes"])

    # ------------------------------------------------------------------ bookkeeping
    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (STATE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.out / STATE)

    def _phase(self, name: str, fn: Callable[[], dict | None]) -> None:
        if name in self.state["done"]:
            return
        t = time.time()
        result = fn()
        self.state["minutes"][name] = round(self.state["minutes"].get(name, 0) + (time.time() - t) / 60, 2)
        if result:
            self.state.setdefault("results", {})[name] = result
        self.state["done"].append(name)
        self._save()

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    def run(self) -> dict:
        """Run every phase left; returns the state (results, minutes and steps per phase)."""
        self._save()
        self._phase("data", self._data)
        self._phase("init", self._init)
        self._phase("pretrain", lambda: self._train("pretrain", self.out / "init"))
        self._phase("sft", lambda: self._train("sft", self.out / "pretrain"))
        self._phase("eval-sft", lambda: self._eval(self.out / "sft", "sft", ("test",)))
        self._phase("dpo", lambda: self._train("dpo", self.out / "sft"))
        self._phase("final", self._final)
        self._phase("eval", lambda: self._eval(self.out / "final", "final", ("test", "test-novel")))
        plot_recipe_losses({t: self.out / t / "metrics.jsonl" for t in TRAINED}, self.out / "loss.png")
        return self.state

    # ------------------------------------------------------------------ phases
    def _data(self) -> dict:
        shutil.rmtree(self.data_dir, ignore_errors=True)  # a half-written set is redrawn: it is seeded
        p = self.plan
        sizes = {"val": max(p.eval_images // 2, 5), "test": p.eval_images, "test-novel": p.eval_images}
        total = p.train_images + sum(sizes.values())
        done = [0]

        def tick(k: int) -> None:
            done[0] += k
            self.progress("data", done[0], total, {})
        summary = generate(self.data_dir, p.train_images, seed=self.seed, config=p.synth, split_sizes=sizes,
                           progress=tick)
        write_training_files(self.data_dir / "train", self.seed)
        write_training_files(self.data_dir / "val", self.seed)
        return {"images": summary["images"], "qa": summary["qa"]}

    def _init(self) -> dict:
        """The nano config (an ordinary Phi3V config.json) and its random weights, with the real tokenizer."""
        like = self.out / "like"
        shutil.rmtree(like, ignore_errors=True)
        like.mkdir(parents=True)
        copy_tokenizer_files(self.like, like)
        cfg = read_json(self.like / "config.json", "config.json")
        cfg["img_processor"]["layer_idx"] = -1  # the small tower's last layer feeds the projector: none is idle
        cfg.pop(RANDOM_MARKER, None)
        (like / "config.json").write_text(json.dumps(cfg, indent=2))
        pre = read_json(like / "preprocessor_config.json", "preprocessor_config.json") \
            if (like / "preprocessor_config.json").is_file() else {}
        vision = self.plan.sizes
        side = vision.vision_image_size // vision.vision_patch_size // 2
        pre.update(num_crops=self.plan.num_crops, num_img_tokens=side * side)
        (like / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        init = create_random(like, self.out / "init", self.plan.sizes, seed=self.seed, dtype="float32")
        n = sum(t.numel() for t in _tensors(init))
        return {"parameters": n}

    def _train_config(self, task: str, model: Path, steps: int) -> TrainConfig:
        p, d = self.plan, self.data_dir / "train"
        data = {"pretrain": d / "pretrain.jsonl", "sft": d / "sft.jsonl", "dpo": d / "dpo_pairs.jsonl"}[task]
        val = self.data_dir / "val" / data.name
        kw = {}
        if task == "pretrain":  # the tower and projector first learn to feed the random decoder, then everything
            kw["stages"] = f"tower+projector:{max(1, steps // 10)},tower+projector+decoder:{max(1, steps - steps // 10)}"
        if task == "dpo":
            kw.update(beta=0.1, sft_weight=1.0, ref="copy")
        return TrainConfig(task=task, model=str(model), data=str(data), eval_data=str(val), out=str(self.out / task),
                           steps=steps, batch=p.batch if task != "dpo" else max(1, p.batch // 2), lr=p.lr[task],
                           warmup=max(1, steps // 20), min_lr_ratio=0.1, weight_decay=0.01, seed=self.seed,
                           device=self.device, autocast=self.state.get("autocast", "off"),
                           save_every=max(1, min(50, steps // 4)),
                           keep_checkpoints=1, resume=True, export_dtype="float32", **kw)

    def _train(self, task: str, model: Path) -> dict:
        steps = self.state["steps"].get(task) or self.plan.steps.get(task)
        setup, per_step = None, None
        if "autocast" not in self.state:
            setup = prepare(self._train_config(task, model, 1))
            per_step = self._choose_autocast(setup)
        if steps is None:  # the plan: as many steps as the phase's share of the budget holds, timed on 2 steps
            setup = setup or prepare(self._train_config(task, model, 1))
            setup.cfg = self._train_config(task, model, 1)
            per_step = per_step or _time_steps(setup)
            steps = int(min(self.plan.max_steps, max(self.plan.min_steps, self._seconds_for(task) / per_step)))
            self.state.setdefault("step_seconds", {})[task] = round(per_step, 3)
        if self.state["steps"].get(task) != steps:  # recorded before training: a resumed run keeps the count
            self.state["steps"][task] = int(steps)
            self._save()
        cfg = self._train_config(task, model, steps)
        if setup is None:
            setup = prepare(cfg)
        else:
            setup.cfg = cfg
        result = fit(setup, lambda r: self.progress(task, r["step"], r["total_steps"], r))
        evals = [r for r in result.history if r.get("split") == "eval"]
        return {"steps": steps, "final_loss": result.last.get("loss"),
                "eval_loss": evals[-1]["loss"] if evals else None}

    def _choose_autocast(self, setup) -> float | None:
        """state["autocast"]: the plan's setting, or for "fastest" the faster of bf16 autocast and float32 on one
        batch of this phase (float32 where the device has no native bf16); the timings are recorded and the chosen
        one's seconds per step returned (None when nothing was timed)."""
        choice, timed = self.plan.autocast, {}
        if choice == "fastest":
            choice = "off"
            if native_bf16(setup.device):
                for amp in ("off", "bf16"):
                    setup.cfg.autocast = amp
                    timed[amp] = round(_time_steps(setup), 3)
                choice = min(timed, key=timed.get)
                self.state["autocast_seconds"] = timed
        self.state["autocast"] = choice
        self._save()
        return timed.get(choice)

    def _seconds_for(self, task: str) -> float:
        """The phase's part of the budget left: time that earlier phases did not use rolls over to the later ones
        in proportion to their shares (the evaluations keep theirs)."""
        later = TRAINED[TRAINED.index(task):]
        left = self.budget_s - 60 * sum(self.state["minutes"].values())
        shares = self.plan.share
        return max(0.0, left) * shares[task] / (sum(shares[t] for t in later) + shares["eval"])

    def _eval(self, model_dir: Path, name: str, splits: tuple[str, ...]) -> dict:
        out = {}
        for split in splits:
            out[split] = evaluate_split(model_dir, self.data_dir, split, self.out / "reports" / f"{name}-{split}",
                                        self.device, self.plan.eval_batch, self.plan.eval_max_new_tokens,
                                        lambda d, n, s=split: self.progress(f"eval {name} {s}", d, n, {}))
        return out

    def _final(self) -> dict:
        """OUT/final: the DPO export in bfloat16, named phi3v-nano (never random), with the tokenizer files."""
        final = self.out / "final"
        shutil.rmtree(final, ignore_errors=True)
        export_bf16(self.out / "dpo", final, ("config.json",) + TOKENIZER_FILES)
        cfg = read_json(final / "config.json", "config.json")
        cfg.pop(RANDOM_MARKER, None)
        cfg["phi3v_model"] = NAME
        (final / "config.json").write_text(json.dumps(cfg, indent=2))
        return {"bytes": (final / "model.safetensors").stat().st_size}


def parse_steps(text: str) -> dict[str, int]:
    """"pretrain=642,sft=850,dpo=40" -> {"pretrain": 642, ...}: fixed step counts for some trained phases."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in TRAINED or not value.isdigit() or int(value) < 1:
            raise InputError(f"bad --steps item {part!r}: give phase=N with a phase of {', '.join(TRAINED)} and N >= 1, "
                             "e.g. pretrain=642,sft=850,dpo=40")
        out[name] = int(value)
    return out


def _plan_dict(plan: NanoPlan) -> dict:
    d = dataclasses.asdict(plan)
    d["synth"] = dataclasses.asdict(plan.synth)
    return d


def _tensors(folder: Path):
    from safetensors.torch import load_file

    for f in sorted(Path(folder).glob("*.safetensors")):
        yield from load_file(f).values()


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 products in hardware (CUDA with bf16, a CPU with avx512_bf16 or
    amx_bf16): only there can bf16 autocast be the faster choice."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_matmul() in ("amx", "avx512_bf16")


def _time_steps(setup, n: int = 2) -> float:
    """Seconds per optimizer step of this setup (forward + backward of one batch under its autocast setting, the
    best of n); grads are dropped after."""
    loss_fn = LOSSES[setup.cfg.task](setup)
    batch = setup.collate(setup.samples[: setup.cfg.batch])
    batch = batch.to(setup.device) if hasattr(batch, "to") else batch
    amp = autocast_dtype(setup.device, setup.cfg.autocast)
    best = float("inf")
    for p in setup.model.parameters():
        p.requires_grad_(True)
    for _ in range(n):
        t = time.time()
        with autocast_context(setup.device, amp):
            out = loss_fn(setup.model, batch)
        out.total.backward()
        best = min(best, time.time() - t)
    setup.model.zero_grad(set_to_none=True)
    return best * 1.15  # the optimizer step, logging and checkpoints


def run_recipe(out, device: str = "cpu", budget_minutes: float = 110, seed: int = 0, resume: bool = False,
               plan: NanoPlan | None = None, like=None, progress: Progress | None = None) -> dict:
    """Run (or with resume, continue) the nano recipe in OUT; OUT/final is the trained checkpoint."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for but CUDA is not available: use --device cpu")
    return Recipe(out, device, budget_minutes, seed, resume, plan, like, progress).run()

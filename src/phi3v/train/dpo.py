"""Direct preference optimisation as a loss plug-in: TRL's sigmoid / ipo / hinge / robust losses, an optional SFT
term, and reference log-probs from the base with adapters disabled, a frozen copy, or a table computed once.

Notation: P pairs in a batch, rows 0..P-1 are the chosen answers and P..2P-1 the rejected ones (TRL's layout),
T tokens, V vocabulary. logps are sums over the answer tokens of log p(token | prefix).
Formulas as TRL's DPOTrainer (huggingface/trl, trl/trainer/dpo_trainer.py), with d = (logp_c - ref_c) - (logp_r - ref_r):
  sigmoid  -logsigmoid(beta d) (1 - eps) - logsigmoid(-beta d) eps      (eps = label_smoothing, 0 in TRL's default)
  hinge    relu(1 - beta d)
  ipo      (d' - 1 / (2 beta))^2, d' the same difference of per-token averages (each log ratio / its answer length)
  robust   (-(1 - eps) logsigmoid(beta d) + eps logsigmoid(-beta d)) / (1 - 2 eps)
  rewards  beta (logp - ref) per answer; accuracy: chosen reward > rejected reward; margin: their difference.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from phi3v.checkpoint.safetensors import SafetensorsFile, save_file
from phi3v.data.collate import IGNORE, Batch, Encoder, Sample, collate
from phi3v.data.records import BadRecords, Conversation, Preference
from phi3v.errors import CheckpointError, InputError
from phi3v.processing.image import ImageProcessor

from .forward import forward
from .lora import disable_adapters, lora_layers
from .losses import LossOutput

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
REFERENCES = ("adapters", "copy", "precomputed")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) logits, (B, T) labels (-100 where no loss; not shifted) -> (sum of log-probs (B,), tokens (B,)).
    Position t's logits predict label t+1; float32, and only the answer positions' rows are normalised."""
    targets = labels[:, 1:]
    mask = targets != IGNORE  # (B, T-1)
    rows = logits[:, :-1][mask].float()  # (N, V): the answer tokens' predictions only
    token_logps = rows.gather(-1, targets[mask][:, None])[:, 0] - rows.logsumexp(-1)  # (N,)
    which = mask.nonzero()[:, 0]  # the row of each answer token
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=labels.device).index_add(0, which, token_logps)
    return sums, mask.sum(-1)


def check_loss(loss_type: str, beta: float, label_smoothing: float = 0.0) -> None:
    if loss_type not in LOSS_TYPES:
        raise InputError(f"unknown DPO loss {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise InputError(f"DPO beta must be positive, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise InputError(f"label smoothing {label_smoothing} must lie in [0, 0.5)")


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                    beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (P,) and the rewards (P,) of the chosen and rejected answers (detached)."""
    check_loss(loss_type, beta, label_smoothing)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    d = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the answers' token counts")
        d_avg = chosen_ratio / chosen_tokens.clamp_min(1) - rejected_ratio / rejected_tokens.clamp_min(1)
        losses = (d_avg - 1 / (2 * beta)) ** 2
    else:  # robust
        losses = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, float]:
    """TRL's logged names, as sums over the pairs (divided by the pairs they are means, as TRL logs them)."""
    sums = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps.detach(), "logps/rejected": rejected_logps.detach()}
    return {k: float(v.sum()) for k, v in sums.items()}


def sft_term(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's "sft" loss: token-mean cross-entropy over the answers of the rows passed (the chosen ones)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    return F.cross_entropy(logits[:, :-1][mask].float(), targets[mask])


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0  # weight of the SFT term on the chosen answers (0: none)
    ref: str = "adapters"  # "adapters" (base with adapters disabled), "copy" (a frozen model), "precomputed"

    def check(self) -> None:
        check_loss(self.loss_type, self.beta, self.label_smoothing)
        if self.ref not in REFERENCES:
            raise InputError(f"unknown DPO reference {self.ref!r}; use one of {', '.join(REFERENCES)}")


# --------------------------------------------------------------------------- pairs: one prompt, two answers

@dataclass
class PairBatch(Batch):
    """A Batch of 2P rows, chosen answers first; the prompts' images are in it once (image_rows of a rejected row
    point at its chosen row's feature rows). `index` (P,) numbers the pairs in the dataset (precomputed references)."""

    index: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device) -> PairBatch:
        return PairBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()})


@dataclass
class PairSample:
    chosen: Sample
    rejected: Sample
    index: int


def encode_pair(encoder: Encoder, record: Preference, index: int) -> PairSample:
    """The record's prompt followed by each answer, rendered as a conversation (loss mask on the answer)."""
    def side(answer: str) -> Sample:
        return encoder.encode(Conversation([*record.messages, {"role": "assistant", "content": answer}],
                                           record.images, record.where))

    chosen, rejected = side(record.chosen), side(record.rejected)
    if [t for t in chosen.ids if t < 0] != [t for t in rejected.ids if t < 0]:
        raise InputError("the chosen and rejected conversations place the images differently")
    return PairSample(chosen, rejected, index)


def encode_pairs(encoder: Encoder, records: list[Preference], bad: BadRecords, start: int = 0) -> list[PairSample]:
    """Pairs of the good records, numbered in order from `start`; the others go to `bad` with their file:line."""
    out = []
    for r in records:
        try:
            out.append(encode_pair(encoder, r, start + len(out)))
        except InputError as e:
            bad.add(r.where, str(e))
    return out


def collate_pairs(pairs: list[PairSample], pad_id: int, processor: ImageProcessor | None = None,
                  num_crops: int | None = None) -> PairBatch:
    """2P right-padded rows (chosen, then rejected) with each prompt image processed and encoded once."""
    text_only = [Sample(s.ids, s.mask, [], s.where) for s in [p.chosen for p in pairs] + [p.rejected for p in pairs]]
    b = collate(text_only, pad_id)
    index = torch.tensor([p.index for p in pairs], dtype=torch.long)
    if not any(p.chosen.images for p in pairs):
        return PairBatch(b.input_ids, b.labels, b.attention_mask, index=index)
    img = collate([p.chosen for p in pairs], pad_id, processor, num_crops)
    # placeholders of the rejected rows are those of the chosen rows, in the same row-major order
    rows = torch.cat([img.image_rows, img.image_rows])
    return PairBatch(b.input_ids, b.labels, b.attention_mask, img.pixel_values, img.image_sizes, rows, index)


def pair_logps(model: nn.Module, batch: PairBatch, checkpointing: bool = False):
    """(logits, logps (2P,), answer tokens (2P,)) of the batch's rows: one forward, one CLIP pass for its images."""
    logits = forward(model, batch, checkpointing)
    logps, tokens = sequence_logps(logits, batch.labels)
    return logits, logps, tokens


# --------------------------------------------------------------------------- the reference and the loss plug-in

def frozen_copy(model: nn.Module) -> nn.Module:
    """A reference model: a copy of `model` with no trainable parameter, in eval mode."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def reference_logps(model: nn.Module, batch: PairBatch, cfg: DPOConfig, ref_model: nn.Module | None = None,
                    table: torch.Tensor | None = None) -> torch.Tensor:
    """(2P,) reference log-probs of the rows: from `table` (N, 2) by batch.index, from `ref_model`, or from `model`
    with its adapters disabled."""
    if cfg.ref == "precomputed":
        if table is None or batch.index is None:
            raise InputError("ref='precomputed' needs the table of precompute_reference() and batches with an index")
        rows = table.to(batch.input_ids.device)[batch.index]  # (P, 2): chosen, rejected
        return torch.cat([rows[:, 0], rows[:, 1]])
    if cfg.ref == "copy":
        if ref_model is None:
            raise InputError("ref='copy' needs a reference model (frozen_copy(model) before training)")
        return pair_logps(ref_model, batch)[1]
    if not lora_layers(model):
        raise InputError("ref='adapters' needs a model with LoRA adapters; full fine-tuning uses ref='copy' "
                         "or 'precomputed'")
    with disable_adapters(model):
        return pair_logps(model, batch)[1]


def dpo_loss(cfg: DPOConfig | None = None, ref_model: nn.Module | None = None, table: torch.Tensor | None = None,
             checkpointing: bool = False) -> Callable[[nn.Module, PairBatch], LossOutput]:
    """The DPO loss plug-in `loss_fn(model, batch) -> LossOutput`: sums over the batch's pairs (the loop divides by
    the pairs of the step), metrics under TRL's names (as sums; the loop reports means)."""
    cfg = cfg or DPOConfig()
    cfg.check()

    def loss_fn(model: nn.Module, batch: PairBatch) -> LossOutput:
        logits, logps, tokens = pair_logps(model, batch, checkpointing)
        ref = reference_logps(model, batch, cfg, ref_model, table)
        P = batch.num_pairs
        losses, chosen_r, rejected_r = preference_loss(logps[:P], logps[P:], ref[:P], ref[P:], cfg.beta, cfg.loss_type,
                                                       cfg.label_smoothing, tokens[:P], tokens[P:])
        total = losses.sum()
        metrics = {"loss": float(total.detach()), **reward_metrics(chosen_r, rejected_r, logps[:P], logps[P:])}
        if cfg.sft_weight:
            sft = sft_term(logits[:P], batch.labels[:P])  # a token mean, weighed like one pair's loss per pair
            total = total + cfg.sft_weight * sft * P
            metrics["sft_loss"] = float(sft.detach()) * P
        return LossOutput(total, P, metrics)

    return loss_fn


def dpo_loss_fn(model: nn.Module, batch: PairBatch) -> LossOutput:
    """The default plug-in: sigmoid DPO, beta 0.1, reference = the base with adapters disabled."""
    return dpo_loss()(model, batch)


@torch.no_grad()
def precompute_reference(model: nn.Module, pairs: list[PairSample], collate_fn: Callable[[list], PairBatch],
                         batch_size: int = 8, progress: Callable[[int, int], None] | None = None,
                         device=None) -> torch.Tensor:
    """(N, 2) reference log-probs (chosen, rejected): row i is the pair whose index is i (image prompts too). Run
    before adapters are attached (or inside disable_adapters) so that it is the reference model."""
    table = torch.full((1 + max((p.index for p in pairs), default=-1), 2), float("nan"))
    was_training = model.training
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = collate_fn(chunk)
        batch = batch.to(device) if device is not None else batch
        logps = pair_logps(model, batch)[1].float().cpu()
        P = len(chunk)
        table[batch.index.cpu()] = torch.stack([logps[:P], logps[P:]], dim=1)
        if progress is not None:
            progress(start + P, len(pairs))
    model.train(was_training)
    return table


REFERENCE_FILE = "dpo_reference/logps.safetensors"  # under OUT; its own folder: the export replaces OUT/*.safetensors


def save_reference(table: torch.Tensor, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"logps": table.contiguous()}, path, metadata={"format": "pt", "columns": "chosen,rejected"})
    return path


def load_reference(path, num_pairs: int) -> torch.Tensor:
    """The table written by save_reference, checked to cover num_pairs pairs."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"reference log-probs file not found: {path}")
    st = SafetensorsFile(path)
    if "logps" not in st.keys():
        raise CheckpointError(f"{path} has no 'logps' tensor: re-create it with precompute_reference")
    table = st.get("logps").clone()
    if tuple(table.shape) != (num_pairs, 2):
        raise CheckpointError(f"{path} holds reference log-probs of {table.shape[0]} pairs, the data has {num_pairs}: "
                              "precompute them again for this data file (and bad-record policy)")
    return table

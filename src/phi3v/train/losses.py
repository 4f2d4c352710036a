"""Loss plug-ins for the one training loop: `loss_fn(model, batch) -> LossOutput`.

A loss returns a SUM over its units (target tokens for language modelling, pairs for DPO) and the number of units;
the loop divides the accumulated gradients by the units of the whole optimizer step, so gradient accumulation
and batch size never change what a unit weighs. Metrics are sums over the same units.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from phi3v.data.collate import IGNORE, Batch
from phi3v.models.phimoe import SparseMoE

from .forward import forward, hidden_states


class LossOutput(NamedTuple):
    total: torch.Tensor  # scalar, summed over units, with grad
    units: int  # what `total` is summed over
    metrics: dict[str, float]  # sums over the units, e.g. {"loss": ..., "aux_loss": ...}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B, T-1) next-token cross entropy in float32, 0 where the label is IGNORE."""
    V = logits.shape[-1]
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="none")
    return loss.view(targets.shape)


@contextmanager
def router_logits(model):
    """Collect every SparseMoE gate's (B*T, E) logits of the forward passes run inside the block."""
    captured: list[torch.Tensor] = []
    hooks = [m.gate.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for m in model.modules() if isinstance(m, SparseMoE)]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def load_balancing_loss(gate_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balancing as transformers' PhimoeForCausalLM computes it (`load_balancing_loss_func`
    with the attention mask): E * sum_e (share of top-k picks to e) * (mean router probability of e), padding out."""
    flat = attention_mask.reshape(-1).float()  # (B*T,)
    picks = torch.zeros(num_experts, device=flat.device)
    probs = torch.zeros(num_experts, device=flat.device)
    for g in gate_logits:
        p = torch.softmax(g.float(), dim=-1)  # (B*T, E)
        chosen = torch.topk(p, top_k, dim=-1).indices
        picks = picks.scatter_add(0, chosen.reshape(-1), flat.repeat_interleave(top_k))
        probs = probs + (p * flat[:, None]).sum(0)
    rows = flat.sum() * len(gate_logits)
    return (picks / rows * (probs / rows)).sum() * num_experts


def next_token_loss(model, batch: Batch, *, aux_coef: float = 0.0, checkpointing: bool = False) -> LossOutput:
    """Cross entropy of every labelled token (SFT: assistant tokens; pretraining: caption text); for PhiMoE plus
    aux_coef (config.json's router_aux_loss_coef) * the load-balancing loss, per token as transformers adds it
    (mean loss = CE + coef * aux). The LM head runs only where a token is predicted: (targets, V) logits, not
    (B, T, V)."""
    with router_logits(model) as gates:
        h = hidden_states(model, batch, checkpointing)  # (B, T, C)
        gates = list(gates)  # recomputation in backward (checkpointing) must not add to them
    targets = batch.labels[:, 1:]
    where = targets != IGNORE  # (B, T-1)
    logits = model.lm_head(h[:, :-1][where])  # (n, V)
    ce = F.cross_entropy(logits.float(), targets[where], reduction="sum")
    n = int(where.sum())
    metrics = {"loss": float(ce.detach())}
    total = ce
    if gates:
        aux = load_balancing_loss(gates, model.config.num_local_experts, model.config.num_experts_per_tok,
                                  batch.attention_mask)
        metrics["aux_loss"] = float(aux.detach()) * n
        if aux_coef:
            total = total + aux_coef * aux * n
    return LossOutput(total, n, metrics)


def per_sample_losses(model, batch: Batch) -> torch.Tensor:
    """(B,) mean next-token loss of each sample (no grad needed by the caller; used by evaluation and tests)."""
    losses = token_losses(forward(model, batch), batch.labels)
    counts = (batch.labels[:, 1:] != IGNORE).sum(1).clamp_min(1)
    return losses.sum(1) / counts

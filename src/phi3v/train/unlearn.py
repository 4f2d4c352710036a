"""\"Who's Harry Potter\" unlearning (Eldan & Russinovich, 2023) as a label plug-in for the one training loop.

(a) a reinforced model: the base fine-tuned further on the forget text;
(b) anchored terms replaced by generic translations (longest match first, one translation per term per text);
(c) generic labels per token, v_generic = v_base - alpha * ReLU(v_reinforced - v_base), where v_base are the base's
    logits on the translated block at the aligned position and v_reinforced the reinforced model's on the original;
    the label is the argmax;
(d) the base fine-tuned on the original text towards those labels (next-token loss, labels != inputs); unlike the
    paper, a retain text given is mixed into this fine-tuning with its own tokens as labels (`retain_mix`).
Defaults: alpha 5 and 512-token blocks, as recalled from the paper (not checked against its text here); the step
counts and learning rates are this implementation's. The forget text is a plain-text file (packed into blocks of
`block` tokens) or a JSONL of conversations (one block each, labels on the assistant tokens only).
"""

from __future__ import annotations

import copy
import difflib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phi3v.checkpoint.hub import resolve_model_dir
from phi3v.checkpoint.load import load_causal_lm, parse_dtype
from phi3v.data.collate import IGNORE, Batch
from phi3v.data.loader import Loader
from phi3v.data.records import BadRecords, read_records
from phi3v.errors import InputError, Phi3VError
from phi3v.models import config_from_dict
from phi3v.models.config import read_json
from phi3v.processing.render import render
from phi3v.processing.tokenizer import Tokenizer

from .export import export_hf
from .loop import make_optimizer, train, warmup_cosine
from .losses import next_token_loss, token_losses

REPORT, PLOT = "unlearn_report.json", "unlearn_probes.png"


@dataclass
class UnlearnConfig:
    model: str
    forget: str
    out: str
    anchors: str | None = None  # JSON {"term": "generic" or ["generic", ...]} or lines "term<TAB>generic"
    retain: str | None = None  # text (or JSONL conversations) whose perplexity must not suffer
    probes: str | None = None  # JSONL {"prompt", "prefix"?, "target"}: held-out completion checks and the plot
    alpha: float = 5.0
    block: int = 512
    reinforce_steps: int = 100
    reinforce_lr: float = 1e-5
    steps: int = 150
    lr: float = 1e-5
    batch: int = 8
    retain_mix: bool = True  # the retain blocks join (d) with their own tokens as labels (not in the paper)
    seed: int = 0
    probe_every: int = 10
    dtype: str = "float32"
    device: str = "cpu"


@dataclass
class Block:
    """One aligned pair: the original ids with their loss mask, the translated ids, and orig -> trans positions."""

    ids: list[int]
    mask: list[int]
    translated: list[int]
    align: list[int | None]
    labels: list[int] = field(default_factory=list)


# ---- (b) anchored terms ----
def read_anchors(path: str | Path | None) -> dict[str, list[str]]:
    """{term: [generic translations]} from a JSON object or "term<TAB>generic[<TAB>generic...]" lines."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise InputError(f"anchors file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        d = {}
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                parts = [s.strip() for s in line.split("\t")]
                if len(parts) < 2 or not all(parts):
                    raise InputError(f"{p}:{n}: an anchors line is 'term<TAB>generic translation'")
                d[parts[0]] = parts[1:]
    if not isinstance(d, dict) or not all(isinstance(v, (str, list)) and v for v in d.values()):
        raise InputError(f"{p} must map each anchored term to a generic translation (or a list of them)")
    return {k: [v] if isinstance(v, str) else [str(x) for x in v] for k, v in d.items()}


class Translator:
    """Replaces anchored terms, longest first, whole words only; a term with several translations gets one of
    them per text (seeded by the text), the same at every occurrence."""

    def __init__(self, anchors: dict[str, list[str]]):
        self.anchors = anchors
        terms = sorted(anchors, key=len, reverse=True)
        self.pattern = re.compile("|".join(rf"(?<!\w){re.escape(t)}(?!\w)" for t in terms)) if terms else None

    def __call__(self, text: str, key: str = "") -> str:
        if self.pattern is None:
            return text
        rng = random.Random(key or text)
        chosen: dict[str, str] = {}

        def sub(m: re.Match) -> str:
            term = m.group(0)
            if term not in chosen:
                chosen[term] = rng.choice(self.anchors[term])
            return chosen[term]
        return self.pattern.sub(sub, text)


def align(orig: list[int], trans: list[int]) -> list[int | None]:
    """For each original position t, the translated position whose prefix corresponds (None inside a replaced term):
    tokens in matching runs map one to one; the token before a run maps to the token before its translation."""
    out: list[int | None] = [None] * len(orig)
    for i, j, n in difflib.SequenceMatcher(None, orig, trans, autojunk=False).get_matching_blocks():
        for k in range(n):
            out[i + k] = j + k
        if n and i > 0 and j > 0 and out[i - 1] is None:
            out[i - 1] = j - 1
    return out


# ---- reading the texts ----
def _text_blocks(text: str, tok: Tokenizer, block: int) -> list[str]:
    """Lines packed greedily into pieces of at most `block` tokens (a longer line is a piece of its own)."""
    pieces, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        k = len(tok.encode(line))
        if cur and n + k > block:
            pieces.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += k
    if "".join(cur).strip():
        pieces.append("".join(cur))
    return pieces


def read_units(path: str | Path) -> list:
    """A JSONL file's conversations (lists of messages) or a text file's whole text (one str)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"file not found: {p}")
    if p.suffix == ".jsonl":
        records, _ = read_records(p, "conversation", BadRecords("error"))
        return [r.messages for r in records]
    return [p.read_text(encoding="utf-8")]


def encode_unit(tok: Tokenizer, unit, block: int) -> list[tuple[list[int], list[int], object]]:
    """(ids, loss mask, source) of each block of a unit: a conversation is one block, a text is cut into blocks."""
    if isinstance(unit, str):
        out = []
        for piece in _text_blocks(unit, tok, block):
            ids = tok.encode(piece)
            out.append((ids, [1] * len(ids), piece))
        return out
    ids, mask = render(tok, unit)
    return [(ids, mask, unit)]


def make_blocks(tok: Tokenizer, units: list, translator: Translator, block: int) -> list[Block]:
    blocks = []
    for unit in units:
        for ids, mask, src in encode_unit(tok, unit, block):
            if isinstance(src, str):
                translated = tok.encode(translator(src))
            else:
                key = json.dumps(src)
                translated, _ = render(tok, [{**m, "content": translator(m["content"], key)} for m in src])
            blocks.append(Block(ids, mask, translated, align(ids, translated)))
    return blocks


# ---- (c) generic labels ----
@torch.no_grad()
def _logits(model, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(torch.tensor([ids], device=device))[0].float()  # (T, V)


@torch.no_grad()
def generic_labels(base, reinforced, blocks: list[Block], alpha: float) -> None:
    """Set each block's labels: labels[t + 1] = argmax v_generic at t where t is aligned and t + 1 is a target."""
    for b in blocks:
        v_base_t, v_reinf = _logits(base, b.translated), _logits(reinforced, b.ids)
        labels = [IGNORE] * len(b.ids)
        rows = [t for t in range(len(b.ids) - 1) if b.mask[t + 1] and b.align[t] is not None]
        if rows:
            vb = v_base_t[[b.align[t] for t in rows]]  # (R, V)
            generic = vb - alpha * torch.relu(v_reinf[rows] - vb)
            for t, label in zip(rows, generic.argmax(-1).tolist()):
                labels[t + 1] = label
        b.labels = labels


# ---- (a), (d) fine-tuning through the one loop ----
def collate_labels(samples: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-padded (ids, labels) rows; labels may differ from the ids (the generic labels)."""
    T = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(samples), T), dtype=torch.bool)
    for i, (ids, lab) in enumerate(samples):
        input_ids[i, :len(ids)], labels[i, :len(lab)], attn[i, :len(ids)] = torch.tensor(ids), torch.tensor(lab), True
    return Batch(input_ids, labels, attn)


def finetune(model, samples, pad_id: int, cfg: UnlearnConfig, steps: int, lr: float,
             on_step: Callable[[int, dict], None] | None = None) -> dict:
    """`steps` AdamW steps of the next-token loss towards each sample's labels (the one training loop)."""
    for p in model.parameters():
        p.requires_grad_(True)
    loader = Loader(samples, cfg.batch, lambda s: collate_labels(s, pad_id), seed=cfg.seed)
    optimizer = make_optimizer([{"name": "decoder", "params": list(model.parameters())}], lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(0, steps, 0.1))
    last = train(model, next_token_loss, loader, optimizer, scheduler, steps=steps, device=cfg.device,
                 on_step=on_step)
    model.eval()
    return last


# ---- measurements ----
@torch.no_grad()
def familiarity(model, blocks: list[Block]) -> float:
    """Mean probability the model gives the forget text's idiosyncratic next tokens: those whose generic label
    differs from the original token."""
    probs = []
    for b in blocks:
        p = torch.softmax(_logits(model, b.ids), -1)
        probs += [float(p[t - 1, b.ids[t]]) for t in range(1, len(b.ids)) if b.labels[t] not in (IGNORE, b.ids[t])]
    return sum(probs) / max(len(probs), 1)


@torch.no_grad()
def perplexity(model, samples: list[tuple[list[int], list[int]]], pad_id: int) -> float:
    nll, n = 0.0, 0
    for ids, labels in samples:
        batch = collate_labels([(ids, labels)], pad_id).to(next(model.parameters()).device)
        losses = token_losses(model(batch.input_ids), batch.labels)
        nll, n = nll + float(losses.sum()), n + batch.num_targets
    return float(torch.exp(torch.tensor(nll / max(n, 1))))


def read_probes(path: str | Path | None) -> list[dict]:
    if path is None:
        return []
    p = Path(path)
    if not p.is_file():
        raise InputError(f"probes file not found: {p}")
    probes = [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not all(isinstance(q, dict) and isinstance(q.get("prompt"), str) and isinstance(q.get("target"), str)
               for q in probes):
        raise InputError(f"{p}: each line is {{\"prompt\": ..., \"target\": ...}} (and optionally \"prefix\")")
    return probes


def probe_ids(tok: Tokenizer, probe: dict, chat: bool) -> tuple[list[int], int]:
    """(context ids, the target's first token): the prompt (a user turn when the model has a chat template), then
    the probe's optional "prefix" (the start of the answer, e.g. "Harry Potter studies"), then the target."""
    prefix = probe.get("prefix", "")
    if chat:
        user = {"role": "user", "content": probe["prompt"]}
        full, _ = render(tok, [user, {"role": "assistant", "content": prefix + probe["target"]}])
        short, _ = render(tok, [user, {"role": "assistant", "content": prefix}])
    else:
        full, short = tok.encode(probe["prompt"] + prefix + probe["target"]), tok.encode(probe["prompt"] + prefix)
    k = next((i for i, (x, y) in enumerate(zip(full, short)) if x != y), len(short))
    if k >= len(full):
        raise InputError(f"probe {probe!r}: the target adds no token")
    return full[:k], full[k]


def has_chat_template(tok: Tokenizer) -> bool:
    try:
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        return True
    except Phi3VError:  # e.g. Phi-2: probes are plain text
        return False


@torch.no_grad()
def probe_probs(model, probes: list[tuple[list[int], int]]) -> list[float]:
    return [float(torch.softmax(_logits(model, ids)[-1], -1)[target]) for ids, target in probes]


@torch.no_grad()
def completes(model, probes: list[tuple[list[int], int]]) -> list[bool]:
    """Whether the greedy next token is the target's first token, per probe."""
    return [int(_logits(model, ids)[-1].argmax()) == target for ids, target in probes]


# ---- the recipe ----
@dataclass
class UnlearnResult:
    out: Path
    report: dict


def unlearn(cfg: UnlearnConfig, progress: Callable[[str, dict], None] | None = None) -> UnlearnResult:
    """Run (a)-(d), export the unlearned model to cfg.out with unlearn_report.json and the probe plot.
    `progress(phase, record)` sees each training step of "reinforce" and "unlearn"."""
    if cfg.alpha < 0 or cfg.block < 8 or min(cfg.steps, cfg.reinforce_steps, cfg.batch) < 1:
        raise InputError("need alpha >= 0, block >= 8 tokens and steps, reinforce steps and batch >= 1")
    model_dir = resolve_model_dir(cfg.model)
    raw = read_json(model_dir / "config.json", "config.json")
    if "quantization" in raw:
        raise InputError(f"{model_dir} is quantized: unlearn the float checkpoint")
    mcfg = config_from_dict(raw)
    tok = Tokenizer.from_dir(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    base = load_causal_lm(model_dir, mcfg, parse_dtype(cfg.dtype), cfg.device, raw=raw)
    translator = Translator(read_anchors(cfg.anchors))
    blocks = make_blocks(tok, read_units(cfg.forget), translator, cfg.block)
    retain = [(ids, [i if m else IGNORE for i, m in zip(ids, mask)])
              for u in (read_units(cfg.retain) if cfg.retain else []) for ids, mask, _ in encode_unit(tok, u, cfg.block)]
    chat = has_chat_template(tok)
    probes = [probe_ids(tok, p, chat) for p in read_probes(cfg.probes)]

    def say(phase):
        return None if progress is None else (lambda step, record: progress(phase, record))

    # (a) the reinforced model
    reinforced = copy.deepcopy(base)
    forget_samples = [(b.ids, [i if m else IGNORE for i, m in zip(b.ids, b.mask)]) for b in blocks]
    finetune(reinforced, forget_samples, pad, cfg, cfg.reinforce_steps, cfg.reinforce_lr, say("reinforce"))
    # (c) generic labels (the translations of (b) are in the blocks)
    base.eval()
    generic_labels(base, reinforced, blocks, cfg.alpha)
    del reinforced
    before = {"familiarity": familiarity(base, blocks), "probe_probs": probe_probs(base, probes),
              "probe_completes": completes(base, probes),
              "retain_perplexity": perplexity(base, retain, pad) if retain else None}
    # (d) fine-tune the base towards the generic labels, probing the targets as it goes
    curve = [{"step": 0, "probs": before["probe_probs"]}]
    inner = say("unlearn")

    def on_step(step, record):
        if probes and (step % cfg.probe_every == 0 or step == cfg.steps):
            curve.append({"step": step, "probs": probe_probs(base, probes)})
            base.train()
        if inner is not None:
            inner(step, record)
    labelled = [(b.ids, b.labels) for b in blocks if any(x != IGNORE for x in b.labels)]
    if not labelled:
        raise InputError("no token of the forget text got a generic label: is the forget file empty?")
    finetune(base, labelled + (retain if cfg.retain_mix else []), pad, cfg, cfg.steps, cfg.lr, on_step)
    after = {"familiarity": familiarity(base, blocks), "probe_probs": probe_probs(base, probes),
             "probe_completes": completes(base, probes),
             "retain_perplexity": perplexity(base, retain, pad) if retain else None}
    out = Path(cfg.out)
    export_hf(base, raw, model_dir, out)
    report = {"before": before, "after": after, "curve": curve, "blocks": len(blocks),
              "labelled_tokens": sum(x != IGNORE for b in blocks for x in b.labels),
              "changed_labels": sum(x not in (IGNORE, i) for b in blocks for i, x in zip(b.ids, b.labels)),
              "probes": [p["target"] for p in read_probes(cfg.probes)],
              "config": {k: v for k, v in vars(cfg).items()}}
    (out / REPORT).write_text(json.dumps(report, indent=2))
    if probes:
        plot_probes(curve, report["probes"], out / PLOT)
    return UnlearnResult(out, report)


def plot_probes(curve: list[dict], targets: list[str], path: Path) -> Path | None:
    """Next-token probability of each probe's target across the unlearning steps (the paper's figure), as a PNG;
    None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    steps = [c["step"] for c in curve]
    for i, target in enumerate(targets):
        ax.plot(steps, [c["probs"][i] for c in curve], "o-", label=target)
    ax.set_xlabel("unlearning step")
    ax.set_ylabel("p(target | prompt)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

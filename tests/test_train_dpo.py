"""DPO: TRL's loss formulas by hand, ln 2 and zero rewards at step 0 (each reference kind), image prompts encoded
once for both answers, and a tiny LoRA run whose training pairs end > 0.9 accurate with the held-out margin up."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import phi3v
from phi3v.checkpoint.random import create_random
from phi3v.data.collate import Encoder
from phi3v.data.loader import Loader
from phi3v.data.records import BadRecords, read_records
from phi3v.errors import CheckpointError, InputError
from phi3v.train.dpo import (
    METRICS, DPOConfig, collate_pairs, dpo_loss, encode_pairs, frozen_copy, load_reference, pair_logps,
    precompute_reference, preference_loss, save_reference, sequence_logps,
)
from phi3v.train.lora import DECODER_TARGETS, apply_lora, lora_layers
from phi3v.train.loop import evaluate, make_optimizer, train

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MINI, VISION = SHARED / "reference" / "Phi-3.5-mini-instruct", SHARED / "reference" / "Phi-3.5-vision-instruct"
SIZES = dict(layers=2, hidden=64, heads=4, intermediate=96, dtype="float32")
LN2 = math.log(2)


def softplus(x: float) -> float:  # -logsigmoid(-x)
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------- formulas

def t(*v):
    return torch.tensor(v, dtype=torch.float64)


# chosen log ratio +1, rejected -1: d = 2; beta 0.5 -> beta d = 1
LOGPS = dict(chosen=t(-10.0), rejected=t(-12.0), ref_chosen=t(-11.0), ref_rejected=t(-11.0))


@pytest.mark.parametrize("loss_type, beta, eps, want", [
    ("sigmoid", 0.5, 0.0, softplus(-1)),  # -logsigmoid(1)
    ("sigmoid", 0.5, 0.1, 0.9 * softplus(-1) + 0.1 * softplus(1)),  # cDPO label smoothing
    ("hinge", 0.5, 0.0, 0.0),  # relu(1 - 1)
    ("hinge", 0.25, 0.0, 0.5),  # relu(1 - 0.5)
    ("ipo", 0.5, 0.0, (1 / 4 + 1 / 2 - 1) ** 2),  # per-token ratios 1/4 and -1/2; 1/(2 beta) = 1
    ("robust", 0.5, 0.1, (0.9 * softplus(-1) - 0.1 * softplus(1)) / 0.8),
])
def test_loss_formulas_by_hand(loss_type, beta, eps, want):
    losses, chosen_r, rejected_r = preference_loss(**LOGPS, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                                   chosen_tokens=t(4), rejected_tokens=t(2))
    assert losses.item() == pytest.approx(want, abs=1e-12)
    assert (chosen_r.item(), rejected_r.item()) == pytest.approx((beta, -beta))


@pytest.mark.parametrize("loss_type, want", [("sigmoid", LN2), ("robust", LN2), ("hinge", 1.0), ("ipo", 1.0)])
def test_policy_equal_to_reference(loss_type, want):
    x = t(-3.0, -7.5)
    losses, c, r = preference_loss(x, x - 1, x, x - 1, beta=0.5, loss_type=loss_type, label_smoothing=0.2,
                                   chosen_tokens=t(3, 5), rejected_tokens=t(2, 2))
    assert losses.tolist() == pytest.approx([want, want], abs=1e-12)
    assert c.abs().max() == 0 and r.abs().max() == 0


def test_bad_settings_are_user_errors():
    with pytest.raises(InputError, match="unknown DPO loss"):
        DPOConfig(loss_type="kto").check()
    with pytest.raises(InputError, match="beta"):
        DPOConfig(beta=0).check()
    with pytest.raises(InputError, match="label smoothing"):
        DPOConfig(loss_type="robust", label_smoothing=0.5).check()
    with pytest.raises(InputError, match="reference"):
        DPOConfig(ref="none").check()


def test_sequence_logps_sums_the_answer_tokens():
    logits = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[7, -100, 3, 1]])  # targets: position 2 (from logits 1) and 3 (from logits 2)
    logps, n = sequence_logps(logits, labels)
    ls = logits.log_softmax(-1)
    assert n.tolist() == [2]
    assert logps.item() == pytest.approx((ls[0, 1, 3] + ls[0, 2, 1]).item(), abs=1e-6)


# --------------------------------------------------------------------------- models and data

@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return create_random(MINI, tmp_path_factory.mktemp("dpo_text"), seed=11, std=0.1, **SIZES)


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory) -> Path:
    return create_random(VISION, tmp_path_factory.mktemp("dpo_vision"), seed=12, std=0.1, **SIZES)


def write_triples(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_of(loaded, path: Path, num_crops=None):
    enc = Encoder(loaded.tokenizer, loaded.processor, num_crops=num_crops, max_length=512)
    records, _ = read_records(path, "preference", BadRecords("error"))
    return enc, encode_pairs(enc, records, BadRecords("error"))


def collate_fn(loaded, enc):
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    return lambda chunk: collate_pairs(chunk, pad, enc.processor, enc.num_crops)


GOOD = ["Yes, it is very good.", "Yes, very good indeed.", "It is good, yes.", "Very good, yes."]
BAD = ["No. Bad, bad item.", "Bad. No.", "No, it is bad.", "Bad item, no."]
TRIPLES = [{"prompt": f"Is item {i} any good?", "chosen": GOOD[i % 4], "rejected": BAD[(i + 1) % 4]} for i in range(8)]
HELD_OUT = [{"prompt": f"What about thing {c}?", "chosen": GOOD[i], "rejected": BAD[i]} for i, c in enumerate("ABCD")]


@pytest.fixture(scope="module")
def text_pairs(text_dir, tmp_path_factory):
    loaded = phi3v.load(text_dir, dtype="float32")
    d = tmp_path_factory.mktemp("dpo_data")
    enc, train = pairs_of(loaded, write_triples(d / "train.jsonl", TRIPLES))
    _, held = pairs_of(loaded, write_triples(d / "held.jsonl", HELD_OUT))
    return loaded, enc, train, held


@pytest.mark.parametrize("ref", ["adapters", "copy", "precomputed"])
def test_step_zero_is_ln2_with_zero_rewards(text_pairs, ref, tmp_path):
    loaded, enc, train, _ = text_pairs
    model = phi3v.load(loaded.path, dtype="float32").model
    copy = frozen_copy(model) if ref == "copy" else None
    collate = collate_fn(loaded, enc)
    table = None
    if ref == "precomputed":  # computed once, written, read back
        path = save_reference(precompute_reference(model, train, collate, batch_size=3), tmp_path / "ref.safetensors")
        table = load_reference(path, len(train))
    apply_lora(model, DECODER_TARGETS, r=4, alpha=8)
    batch = collate(train[:4])
    assert torch.equal(batch.index, torch.arange(4))
    out = dpo_loss(DPOConfig(beta=0.1, ref=ref), ref_model=copy, table=table)(model, batch)
    assert out.units == 4 and out.total.item() / 4 == pytest.approx(LN2, abs=1e-6)
    metrics = {k: v / out.units for k, v in out.metrics.items()}
    assert set(METRICS) <= set(metrics) and metrics["loss"] == pytest.approx(LN2, abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[k] == pytest.approx(0, abs=1e-6), k
    assert metrics["logps/chosen"] < 0 and metrics["logps/rejected"] < 0
    out.total.backward()  # the gradient flows into the adapters
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for m in lora_layers(model).values())


def test_precomputed_table_must_match_the_data(text_pairs, tmp_path):
    path = save_reference(torch.zeros(3, 2), tmp_path / "r.safetensors")
    with pytest.raises(CheckpointError, match="3 pairs"):
        load_reference(path, len(text_pairs[2]))


def test_pair_rows_match_each_conversation_alone(text_pairs):
    """The padded 2P batch gives each answer the log-prob it has when run alone (right padding is harmless)."""
    loaded, enc, train, _ = text_pairs
    model = loaded.model
    batch = collate_fn(loaded, enc)(train[:3])
    _, logps, tokens = pair_logps(model, batch)
    for i, p in enumerate(train[:3]):
        for row, s in ((i, p.chosen), (3 + i, p.rejected)):
            alone = collate_fn(loaded, enc)([type(p)(s, s, 0)])
            assert pair_logps(model, alone)[1][0].item() == pytest.approx(logps[row].item(), abs=1e-4)
            assert tokens[row].item() == sum(s.mask)  # the answer and its <|end|>


def test_image_prompts_encode_each_image_once(vision_dir, tmp_path):
    loaded = phi3v.load(vision_dir, dtype="float32")
    from PIL import Image

    for name, color in (("red.png", (200, 30, 30)), ("blue.png", (20, 40, 220))):
        Image.new("RGB", (50, 40), color).save(tmp_path / name)
    rows = [{"prompt": "<|image_1|>\nWhat color?", "chosen": "Red.", "rejected": "Blue, surely.", "images": ["red.png"]},
            {"prompt": "Which color is this?", "chosen": "Blue.", "rejected": "Green.", "images": ["blue.png"]},
            {"prompt": "No image here.", "chosen": "Fine.", "rejected": "Not fine at all."}]
    enc, pairs = pairs_of(loaded, write_triples(tmp_path / "v.jsonl", rows), num_crops=1)
    model = loaded.model
    calls = []
    model.model.vision_embed_tokens.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    batch = collate_fn(loaded, enc)(pairs)
    assert batch.pixel_values.shape[0] == 2  # two images for six rows
    apply_lora(model, DECODER_TARGETS, r=4, alpha=8)
    out = dpo_loss(DPOConfig(ref="adapters"))(model, batch)
    assert out.total.item() / 3 == pytest.approx(LN2, abs=1e-6)
    assert calls == [2, 2]  # policy pass, reference pass: each one CLIP pass over the 2 images, not one per row
    # rows' log-probs equal the one-prompt path of the model (Phi3VForCausalLM.embed): an image chosen row and an
    # image rejected row (whose image rows are its chosen row's); text rows: test_pair_rows_match_each_conversation_alone
    _, logps, _ = pair_logps(model, batch)
    for row, s in ((0, pairs[0].chosen), (4, pairs[1].rejected)):
        ids = torch.tensor([s.ids])
        kw = {}
        if s.images:
            out = loaded.processor(s.images, num_crops=1)
            kw = dict(pixel_values=out["pixel_values"], image_sizes=out["image_sizes"])
        with torch.no_grad():
            logits = model(inputs_embeds=model.embed(ids, **kw))
        labels = torch.where(torch.tensor([s.mask]).bool() & (ids >= 0), ids, -100)
        assert sequence_logps(logits, labels)[0].item() == pytest.approx(logps[row].item(), abs=1e-4)


def test_dpo_training_separates_the_answers(text_pairs):
    """The package's loop with the DPO plug-in: accuracy on the training pairs > 0.9, the held-out margin up."""
    torch.manual_seed(0)
    loaded, enc, train_pairs, held = text_pairs
    model = phi3v.load(loaded.path, dtype="float32").model
    apply_lora(model, DECODER_TARGETS, r=8, alpha=16)
    collate = collate_fn(loaded, enc)
    loss_fn = dpo_loss(DPOConfig(beta=0.1, sft_weight=0.1))
    before = evaluate(model, loss_fn, [collate(held)])
    opt = make_optimizer([{"name": "lora", "params": [p for p in model.parameters() if p.requires_grad]}], lr=1e-2)
    last = train(model, loss_fn, Loader(train_pairs, 4, collate, seed=0), opt, steps=5)
    assert set(METRICS) <= set(last) and last["step"] == 5
    trained = evaluate(model, loss_fn, [collate(train_pairs)])
    after = evaluate(model, loss_fn, [collate(held)])
    assert before["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert trained["rewards/accuracies"] > 0.9
    assert after["rewards/margins"] > before["rewards/margins"] + 0.1, (before, after)


def test_cli_dpo_with_lora_and_bit_identical_resume(text_dir, tmp_path):
    """`phi3v train dpo --lora-r --ref precomputed`: TRL-named metrics (ln 2 and zero rewards at step 1), OUT/adapter,
    a merged Hugging Face folder equal to the base plus that adapter; and a run stopped after its step-2 checkpoint
    (adapter-only) and resumed (reference table read back) ends with the same adapter, bit for bit."""
    import argparse

    from safetensors.torch import load_file

    from phi3v.cli import train as cli
    from phi3v.train.config import TrainConfig
    from phi3v.train.lora import load_adapter
    from phi3v.train.run import fit, prepare

    data = write_triples(tmp_path / "t.jsonl", TRIPLES)
    flags = dict(model=str(text_dir), data=str(data), steps=4, batch=3, lr=1e-2, lora_r=4, lora_alpha=8, beta=0.1,
                 ref="precomputed", save_every=2, seed=1)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    argv = ["dpo"] + [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert cli.run(parser.parse_args(argv + ["--out", str(tmp_path / "a")])) == 0
    out = tmp_path / "a"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and set(METRICS) <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5) and rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert rows[-1]["rewards/margins"] > 0
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    merged = phi3v.load(out, dtype="float32").model
    base = phi3v.load(text_dir, dtype="float32").model
    load_adapter(base, out / "adapter")
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), base(ids), atol=1e-5, rtol=0)

    def stop(record):
        if record["step"] == 3:
            raise KeyboardInterrupt  # as if killed after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        fit(prepare(TrainConfig(task="dpo", out=str(tmp_path / "b"), **flags)), stop)
    result = fit(prepare(TrainConfig(task="dpo", out=str(tmp_path / "b"), resume=True, **flags)))
    assert result.resumed_from.name == "step-00000002"
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = load_file(tmp_path / "b" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert ckpt and all(".lora_" in k for k in ckpt)  # adapter-only checkpoints

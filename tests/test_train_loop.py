"""The one training loop: SFT memorises a tiny dataset, accumulation = a big batch, the training forward equals the
model's, activation checkpointing, pretraining stages, the PhiMoE router loss as transformers computes it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import write_chat_jsonl
import phi3v
from phi3v.checkpoint.load import load_causal_lm
from phi3v.checkpoint.random import create_random
from phi3v.data.collate import Batch, Encoder, Sample, collate
from phi3v.models import load_config
from phi3v.processing.tokenizer import Tokenizer
from phi3v.train.config import TrainConfig, parse_stages
from phi3v.train.forward import forward
from phi3v.train.loop import make_optimizer, train
from phi3v.train.losses import next_token_loss, token_losses
from phi3v.train.run import fit, part_of, prepare

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEXT_LIKE = SHARED / "reference" / "Phi-3.5-mini-instruct"
VISION_LIKE = SHARED / "reference" / "Phi-3.5-vision-instruct"
SIZES = dict(layers=2, hidden=64, heads=4, intermediate=96, dtype="float32")
QA = [("What is the capital of France?", "Paris."), ("What color is the sky?", "Blue."),
      ("How many legs has a cat?", "Four."), ("What is 2+2?", "Four, of course.")]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return create_random(TEXT_LIKE, tmp_path_factory.mktemp("text"), seed=0, **SIZES)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    return write_chat_jsonl(path, QA)


def text_samples(model_dir, n=4):
    enc = Encoder(Tokenizer.from_dir(model_dir))
    from phi3v.data.records import Conversation

    return [enc.encode(Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}], [], "t"))
            for q, a in QA[:n]]


def test_sft_halves_the_loss_and_answers_the_training_questions(text_dir, sft_file, tmp_path):
    cfg = TrainConfig(model=str(text_dir), data=str(sft_file), out=str(tmp_path / "out"), steps=30, batch=4, lr=2e-2,
                      warmup=5, seed=0)
    result = fit(prepare(cfg))
    train_losses = [r["loss"] for r in result.history if r["split"] == "train"]
    assert len(train_losses) == 30 and train_losses[-1] < train_losses[0] / 2
    model = phi3v.load(tmp_path / "out", dtype="float32")
    answers = [model.generate(q, max_new_tokens=8, temperature=0).text for q, _ in QA]
    assert answers == [a for _, a in QA]
    assert not model.is_random  # the export drops the random-weights marker


def test_grad_accumulation_equals_one_big_batch(text_dir):
    samples = text_samples(text_dir)
    runs = []
    for batches, accum in (([samples], 1), ([samples[:1], samples[1:]], 2)):  # 1 + 3 samples: unequal token counts
        model = load_causal_lm(text_dir, load_config(text_dir), torch.float32)
        opt = make_optimizer([{"name": "all", "params": list(model.parameters())}], 1e-3)
        data = [collate(b, 32000) for b in batches] * 2
        rec = train(model, next_token_loss, iter(data), opt, steps=2, grad_accum=accum, max_grad_norm=None)
        runs.append((rec, model.state_dict()))
    (a, wa), (b, wb) = runs
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for k in wa:  # (Adam divides by |grad|: a near-zero gradient's last-bit difference moves its weight by ~1e-6)
        torch.testing.assert_close(wa[k], wb[k], atol=3e-6, rtol=1e-5)


def test_training_forward_equals_model_forward(tiny_phi3):
    """Right-padded rows of lengths 12, 30 and 70 (window 16 and LongRoPE boundary 64 both bite) give each row's
    own logits; a batch within the window takes the is_causal path (no (B, 1, T, T) mask) with the same result."""
    model = load_causal_lm(tiny_phi3, load_config(tiny_phi3), torch.float32)
    g = torch.Generator().manual_seed(0)
    for lengths in ((12, 30, 70), (5, 16)):
        samples = [Sample(torch.randint(0, 32000, (n,), generator=g).tolist(), [1] * n, [], "t") for n in lengths]
        batch = collate(samples, 32000)
        with torch.no_grad():
            logits = forward(model, batch)
            for b, s in enumerate(samples):
                alone = model(torch.tensor([s.ids]))
                # (float32 GEMMs block M differently on AVX2 and AVX-512: a few logits differ by ~1e-5)
                torch.testing.assert_close(logits[b, :len(s.ids)], alone[0], atol=3e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(text_dir):
    model = load_causal_lm(text_dir, load_config(text_dir), torch.float32)
    batch = collate(text_samples(text_dir), 32000)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        next_token_loss(model, batch, checkpointing=ckpt).total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_step_runs_close_to_float32(text_dir):
    batch = collate(text_samples(text_dir), 32000)
    model = load_causal_lm(text_dir, load_config(text_dir), torch.float32)
    with torch.no_grad():
        full = next_token_loss(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = next_token_loss(model, batch)
    assert half.total.dtype == torch.float32  # the loss itself is taken in float32
    assert half.total.item() / half.units == pytest.approx(full.total.item() / full.units, rel=2e-2)


def test_pretrain_stages_train_only_their_parts(tmp_path):
    from PIL import Image

    vis = create_random(VISION_LIKE, tmp_path / "vis", seed=0, **SIZES)
    Image.new("RGB", (60, 40), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "cap.jsonl").write_text(json.dumps({"image": "red.png", "text": "A red square."}) + "\n")
    cfg = TrainConfig(task="pretrain", model=str(vis), data=str(tmp_path / "cap.jsonl"), out=str(tmp_path / "out"),
                      steps=3, batch=1, lr=1e-3, num_crops=1, stages="projector:2,tower+decoder:1")
    assert cfg.stages == parse_stages([{"steps": 2, "train": ["projector"]}, {"steps": 1, "train": ["tower", "decoder"]}])
    setup = prepare(cfg)
    start = copy.deepcopy(setup.model.state_dict())
    seen = {}
    fit(setup, lambda r: seen.setdefault(r["step"], copy.deepcopy(setup.model.state_dict())))

    def changed(state, ref):
        return {part_of(k) for k in ref if not torch.equal(state[k], ref[k])}
    assert changed(seen[2], start) == {"projector"}
    assert changed(seen[3], seen[2]) == {"tower", "decoder"}
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["num_crops"] == 1
    exported = phi3v.load(tmp_path / "out", dtype="float32")  # the vision export loads, cutting images as trained
    assert exported.is_vision and exported.processor.num_crops == 1


def test_moe_router_loss_as_transformers(tiny_moe):
    """PhimoeForCausalLM(output_router_logits=True)'s aux_loss on a padded batch equals ours, and the loss adds
    router_aux_loss_coef times it per token."""
    transformers = pytest.importorskip("transformers")
    model = load_causal_lm(tiny_moe, load_config(tiny_moe), torch.float32)
    g = torch.Generator().manual_seed(1)
    samples = [Sample(torch.randint(0, 32000, (n,), generator=g).tolist(), [1] * n, [], "t") for n in (20, 13)]
    batch: Batch = collate(samples, 32000)
    coef = 0.25
    with torch.no_grad():
        out = next_token_loss(model, batch, aux_coef=coef)
        ce = token_losses(forward(model, batch), batch.labels).sum() / batch.num_targets
    aux = out.metrics["aux_loss"] / out.units
    assert out.total.item() / out.units == pytest.approx(ce.item() + coef * aux, rel=1e-5)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    with torch.no_grad():
        hf = ref(batch.input_ids, attention_mask=batch.attention_mask.long(), output_router_logits=True)
    assert aux == pytest.approx(hf.aux_loss.item(), rel=1e-5)


def test_warmup_then_cosine_schedule():
    from phi3v.train.loop import autocast_dtype, warmup_cosine

    f = warmup_cosine(2, 10, min_ratio=0.1)
    assert [round(f(s), 6) for s in (0, 1, 2, 6, 10, 12)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 0.55, 0.1, 0.1]
    assert autocast_dtype(torch.device("cpu"), "off") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16

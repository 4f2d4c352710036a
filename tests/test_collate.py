"""Records, the batched Phi-3-V collator and the resumable loader: exact labels, image rows, bad records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v.checkpoint.load import load_causal_lm
from phi3v.checkpoint.random import create_random
from phi3v.data.collate import IGNORE, Encoder, collate
from phi3v.data.loader import Loader
from phi3v.data.records import BadRecords, read_records
from phi3v.errors import InputError
from phi3v.models import load_config
from phi3v.processing.image import ImageProcessor, hd_size, num_image_tokens
from phi3v.processing.tokenizer import Tokenizer
from phi3v.train.forward import forward
from phi3v.train.losses import load_balancing_loss, per_sample_losses

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VISION_LIKE = SHARED / "reference" / "Phi-3.5-vision-instruct"


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory) -> Path:
    return create_random(VISION_LIKE, tmp_path_factory.mktemp("vis"), seed=0, std=0.1, layers=2, hidden=64, heads=4,
                         intermediate=96, dtype="float32")


@pytest.fixture(scope="module")
def encoder(vision_dir) -> Encoder:
    return Encoder(Tokenizer.from_dir(vision_dir), ImageProcessor.from_dir(vision_dir), num_crops=2, max_length=2000)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Two images (landscape, portrait), a corrupt one, and a JSONL file of conversations using them."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    (d / "img").mkdir()
    Image.fromarray((rng.random((120, 500, 3)) * 255).astype(np.uint8)).save(d / "img" / "wide.png")
    Image.fromarray((rng.random((400, 150, 3)) * 255).astype(np.uint8)).save(d / "img" / "tall.png")
    (d / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [
        {"messages": [{"role": "user", "content": "<|image_1|>\nWhat is it?"}, {"role": "assistant", "content": "Noise."},
                      {"role": "user", "content": "And <|image_2|>?"}, {"role": "assistant", "content": "Tall."}],
         "images": ["img/wide.png", "img/tall.png"]},
        {"messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]},
        {"messages": [{"role": "user", "content": "Look"}, {"role": "assistant", "content": "Wide."}],
         "images": ["img/wide.png"]},  # no tag: attached to the first user turn
        {"messages": [{"role": "user", "content": "<|image_1|> x"}, {"role": "assistant", "content": "y"}],
         "images": ["img/bad.png"]},  # corrupt image: found when encoded
        {"messages": [{"role": "user", "content": "<|image_2|> x"}, {"role": "assistant", "content": "y"}],
         "images": ["img/wide.png"]},  # tag mismatch
        {"messages": [{"role": "user", "content": "x"}], "images": ["img/missing.png"]},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "{not json")
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d


def read(data_dir, encoder, policy="skip"):
    bad = BadRecords(policy)
    records, total = read_records(data_dir / "train.jsonl", "conversation", bad)
    return encoder.encode_all(records, bad), bad, total


def test_bad_records_are_reported_with_file_and_line(data_dir, encoder):
    samples, bad, total = read(data_dir, encoder)
    f = data_dir / "train.jsonl"
    assert total == 7 and len(samples) == 3
    assert [w for w, _ in bad.items] == [f"{f}:3", f"{f}:6", f"{f}:7", f"{f}:5"]  # read errors first, then encoding
    reasons = dict(bad.items)
    assert "not valid JSON" in reasons[f"{f}:3"] and "image tags" in reasons[f"{f}:6"]
    assert "not found" in reasons[f"{f}:7"] and "not an image" in reasons[f"{f}:5"]
    assert bad.summary(total) == "4 of 7 records skipped as bad"
    with pytest.raises(InputError, match=f"{f}:3: not valid JSON"):
        read(data_dir, encoder, "error")
    assert samples[0].images == [data_dir / "img" / "wide.png", data_dir / "img" / "tall.png"]  # relative to the file


def test_too_long_is_a_bad_record_never_cut(data_dir, vision_dir):
    enc = Encoder(Tokenizer.from_dir(vision_dir), ImageProcessor.from_dir(vision_dir), num_crops=2, max_length=100)
    samples, bad, _ = read(data_dir, enc)
    assert [len(s.ids) for s in samples] == [17]  # only the text-only record fits; images are ~300 tokens each
    assert sum("longer than max_length 100" in r for _, r in bad.items) == 2
    with pytest.raises(InputError, match="num_crops must be 1 to 16"):
        Encoder(enc.tokenizer, enc.processor, num_crops=17)


def test_batch_labels_and_image_rows_are_exact(data_dir, encoder):
    samples, _, _ = read(data_dir, encoder)
    batch = collate(samples, pad_id=32000, processor=encoder.processor, num_crops=2)
    wide, tall = (num_image_tokens(*hd_size(w, h, 2)) for w, h in ((500, 120), (150, 400)))
    T = max(len(s.ids) for s in samples)
    assert batch.input_ids.shape == (3, T) and batch.lengths.tolist() == [len(s.ids) for s in samples]
    for b, s in enumerate(samples):
        ids = torch.tensor(s.ids)
        want = torch.where(torch.tensor(s.mask, dtype=torch.bool) & (ids >= 0), ids, IGNORE)
        assert torch.equal(batch.labels[b, :len(s.ids)], want)
        assert (batch.labels[b, len(s.ids):] == IGNORE).all() and (batch.input_ids[b, len(s.ids):] == 32000).all()
    assert (batch.labels[batch.input_ids < 0] == IGNORE).all() and batch.labels.min() == IGNORE
    assert ((batch.labels >= 0) | (batch.labels == IGNORE)).all()  # never a negative id as a label
    # placeholders: sample 0 has wide then tall, sample 1 none, sample 2 wide; each count is the formula's
    assert [(batch.input_ids[0] == -k).sum().item() for k in (1, 2)] == [wide, tall]
    assert (batch.input_ids[1] < 0).sum() == 0 and (batch.input_ids[2] == -1).sum() == wide
    # the feature rows each placeholder takes: image after image, in order, no row used twice
    assert torch.equal(batch.image_rows, torch.arange(2 * wide + tall))
    assert batch.pixel_values.shape[:2] == (3, 3) and batch.image_sizes.tolist() == [[336, 672], [672, 336], [336, 672]]
    # the trained pieces of the multi-turn sample
    tok = encoder.tokenizer
    trained = [tok.decode([t], skip_special_tokens=False) for t in batch.labels[0].tolist() if t != IGNORE]
    assert trained == ["No", "ise", ".", "<|end|>", "T", "all", ".", "<|end|>"]


def test_batched_loss_equals_each_sample_alone(data_dir, encoder, vision_dir):
    samples, _, _ = read(data_dir, Encoder(encoder.tokenizer, encoder.processor, num_crops=1, max_length=2000))
    model = load_causal_lm(vision_dir, load_config(vision_dir), torch.float32,
                           raw=json.loads((vision_dir / "config.json").read_text()))
    crops_seen = []
    patch = model.model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding
    hook = patch.register_forward_hook(lambda m, i, o: crops_seen.append(i[0].shape[0]))
    with torch.no_grad():
        together = per_sample_losses(model, collate(samples, 32000, encoder.processor, 1))
        alone = torch.cat([per_sample_losses(model, collate([s], 32000, encoder.processor, 1)) for s in samples])
        # and the batched embedding equals the model's own single-prompt embed for an image sample
        b0 = collate(samples[:1], 32000, encoder.processor, 1)
        ref = model(inputs_embeds=model.embed(b0.input_ids, b0.pixel_values, b0.image_sizes))
        torch.testing.assert_close(forward(model, b0), ref, atol=1e-5, rtol=1e-5)
    hook.remove()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert together.min() > 0
    assert crops_seen[0] == 6  # the batch ran CLIP once, on the 2 crops (global + 1) of each of its 3 images


def test_clip_never_sees_padding_crops(data_dir, encoder, vision_dir):
    """num_crops=4: the wide image fills a 1x4 grid (5 of 5 slots), the tall one 2x1 (3 of 5): CLIP gets 8 crops."""
    enc4 = Encoder(encoder.tokenizer, encoder.processor, num_crops=4, max_length=4000)
    samples, _, _ = read(data_dir, enc4)
    batch = collate(samples[:1], 32000, encoder.processor, 4)
    assert batch.pixel_values.shape[:2] == (2, 5) and batch.image_sizes.tolist() == [[336, 1344], [672, 336]]
    assert (batch.pixel_values[1, 3:] == 0).all()  # the padding slots
    model = load_causal_lm(vision_dir, load_config(vision_dir), torch.float32,
                           raw=json.loads((vision_dir / "config.json").read_text()))
    patch = model.model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding
    seen = []
    hook = patch.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        forward(model, batch)
    hook.remove()
    assert seen == [8]


def test_captions_and_preferences(tmp_path, encoder):
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "c.png")
    (tmp_path / "cap.jsonl").write_text(json.dumps({"image": "c.png", "text": "A red dot."}) + "\n"
                                        + json.dumps({"image": "c.png"}) + "\n")
    bad = BadRecords()
    caps, _ = read_records(tmp_path / "cap.jsonl", "caption", bad)
    s = encoder.encode(caps[0])
    tok = encoder.tokenizer
    assert [tok.decode([t], skip_special_tokens=False) for t, m in zip(s.ids, s.mask) if m] == \
        ["", "\n", "A", "red", "dot", ".", "<|endoftext|>"]
    assert s.ids.count(-1) == num_image_tokens(*hd_size(40, 30, 2)) and bad.items[0][0].endswith("cap.jsonl:2")
    (tmp_path / "pref.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"messages": [{"role": "user", "content": "<|image_1|> Q?"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": "b", "images": ["c.png"]},
        {"prompt": "Q?", "chosen": "good"},
    ]) + "\n")
    bad = BadRecords()
    prefs, _ = read_records(tmp_path / "pref.jsonl", "preference", bad)
    assert [(p.messages[-1]["content"], p.chosen, p.rejected, len(p.images)) for p in prefs] == \
        [("Q?", "good", "bad", 0), ("<|image_1|> Q?", "a", "b", 1)]
    assert len(bad.items) == 1 and "rejected" in bad.items[0][1]


def test_loader_resumes_mid_epoch_at_the_same_sample():
    def run(n_batches, state=None):
        loader = Loader(list(range(7)), 3, collate=list, seed=5)
        if state:
            loader.load_state_dict(state)
        it = iter(loader)
        return [next(it) for _ in range(n_batches)], loader.state_dict()

    full, _ = run(8)
    first, state = run(4)
    assert state["epoch"] == 1 and state["offset"] == 3  # mid-way through the second epoch
    rest, _ = run(4, state)
    assert first + rest == full
    assert [len(b) for b in full[:3]] == [3, 3, 1] and sorted(sum(full[:3], [])) == list(range(7))
    assert full[:3] != full[3:6]  # each epoch reshuffles
    with pytest.raises(InputError, match="same data"):
        Loader(list(range(6)), 3, collate=list, seed=5).load_state_dict(state)
    # two ranks split each global batch and together see what one process sees
    r0, r1 = (Loader(list(range(7)), 2, collate=list, seed=5, rank=r, world=2) for r in (0, 1))
    one = Loader(list(range(7)), 4, collate=list, seed=5)
    assert sorted(r0.next_indices() + r1.next_indices()) == sorted(one.next_indices())


def test_load_balancing_loss_equals_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.phimoe.modeling_phimoe import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    gates = [torch.randn(2 * 5, 16, generator=g) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ours = load_balancing_loss(gates, 16, 2, mask)
    ref = load_balancing_loss_func(tuple(gates), 16, 2, mask)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    assert transformers  # imported for the reference function

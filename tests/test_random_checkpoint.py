"""`create_random`: random checkpoints of every supported family load strictly, and the bundled example image runs
end to end through a random Phi-3.5-vision checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import FIXTURES, REFERENCE, require_shared
from phi3v.models import config_from_dict, load_config
from phi3v.errors import CheckpointError
from phi3v.examples import CHART_SIZE, draw_example_chart, example_image
from phi3v.processing.image import ImageProcessor
from phi3v.checkpoint.load import load_causal_lm
from phi3v.checkpoint.safetensors import read_state_dict
from phi3v.models import build_model
from phi3v.models.phi3_v import TIED_WTE, Phi3VForCausalLM
from phi3v.processing.prompts import tokenize_with_images
from phi3v.checkpoint.random import (RANDOM_MARKER, SMALL_CLIP, TOKENIZER_FILES, create_random,
                                     derive_vision_config)
from phi3v.processing.tokenizer import Tokenizer

PHI35_VISION = REFERENCE / "Phi-3.5-vision-instruct"
PHI3_VISION = REFERENCE / "Phi-3-vision-128k-instruct"
# the fixtures' decoder sizes: hidden 96, 4 heads (head_dim 24, so 12 LongRoPE factors), 2 layers
TINY_VISION = dict(seed=7, std=0.15, layers=2, hidden=96, heads=4, intermediate=192, dtype="float32")


def raw_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def load(folder):
    raw = raw_config(folder)
    return load_causal_lm(folder, config_from_dict(raw), torch.float32, raw=raw)


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory):
    require_shared()
    return create_random(PHI35_VISION, tmp_path_factory.mktemp("tiny_vision"), **TINY_VISION)


def test_vision_checkpoint_loads_strictly(tiny_vision):
    raw = raw_config(tiny_vision)
    assert raw[RANDOM_MARKER] is True
    model = load(tiny_vision)  # load_into raises on any missing, unexpected or misshapen weight
    assert isinstance(model, Phi3VForCausalLM)
    vc = raw["img_processor"]["vision_config"]
    assert {k: vc[k] for k in SMALL_CLIP} == SMALL_CLIP
    assert (vc["image_size"], vc["patch_size"], vc["hidden_act"]) == (336, 14, "quick_gelu")
    assert raw["img_processor"]["image_dim_out"] == 64
    emb = model.model.vision_embed_tokens
    assert emb.glb_GN.shape == (1, 1, 256) and emb.sub_GN.shape == (1, 1, 1, 256)
    assert emb.img_projection[0].weight.shape == (96, 256)
    # the fixture's decoder and CLIP are the same sizes: the same config, bar the marker, dtype and our vision sizes
    fixture = raw_config(FIXTURES / "phi35_vision_tiny")
    assert raw["img_processor"] == fixture["img_processor"]
    assert raw["rope_scaling"] == fixture["rope_scaling"]


def test_vision_weights_follow_the_init_rules(tiny_vision):
    state = read_state_dict(tiny_vision)
    assert TIED_WTE not in state
    vis = "model.vision_embed_tokens."
    clip = vis + "img_processor.vision_model."
    for name in (clip + "pre_layrnorm.weight", clip + "encoder.layers.0.layer_norm1.weight", "model.norm.weight"):
        assert abs(state[name].mean().item() - 1) < 0.05 and 0.05 < state[name].std().item() < 0.15, name
    assert 0.2 < state[vis + "glb_GN"].std().item() < 0.4
    assert 0.02 < state[clip + "encoder.layers.0.mlp.fc1.bias"].std().item() < 0.08
    assert 0.1 < state["model.embed_tokens.weight"].std().item() < 0.2


def test_tokenizer_and_processor_files_are_copied(tiny_vision):
    copied = [f for f in TOKENIZER_FILES if (PHI35_VISION / f).is_file()]
    assert {"tokenizer.json", "preprocessor_config.json", "processor_config.json"} <= set(copied)
    for f in copied:
        assert (tiny_vision / f).read_bytes() == (PHI35_VISION / f).read_bytes(), f


def test_same_seed_same_bytes(tiny_vision, tmp_path):
    again = create_random(PHI35_VISION, tmp_path / "again", **TINY_VISION)
    assert (again / "model.safetensors").read_bytes() == (tiny_vision / "model.safetensors").read_bytes()
    other = create_random(PHI35_VISION, tmp_path / "other", **{**TINY_VISION, "seed": 8})
    assert (other / "model.safetensors").read_bytes() != (tiny_vision / "model.safetensors").read_bytes()


def test_vision_sizes_are_written_and_loaded(tmp_path):
    require_shared()
    out = create_random(PHI3_VISION, tmp_path / "v", layers=1, hidden=64, heads=2, intermediate=64, vision_layers=2,
                        vision_hidden=32, vision_heads=2, vision_intermediate=48)
    raw = raw_config(out)
    vc = raw["img_processor"]["vision_config"]
    assert (vc["num_hidden_layers"], vc["hidden_size"], vc["num_attention_heads"], vc["intermediate_size"]) == (
        2, 32, 2, 48)
    assert raw["img_processor"]["image_dim_out"] == 32 == vc["projection_dim"]
    model = load(out)
    assert model.model.vision_embed_tokens.glb_GN.shape == (1, 1, 128)
    assert len(model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers) == 2
    assert len(raw["rope_scaling"]["short_factor"]) == 64 // 2 // 2


def test_real_clip_is_kept_when_nothing_is_resized():
    require_shared()
    d = raw_config(PHI35_VISION)
    assert "vision_config" not in derive_vision_config(d, shrink=False)["img_processor"]
    assert derive_vision_config(d, shrink=True)["img_processor"]["vision_config"]["hidden_size"] == 64


def test_bad_vision_sizes_are_refused(tmp_path):
    require_shared()
    with pytest.raises(CheckpointError, match="not a Phi-3-vision config"):
        create_random(REFERENCE / "Phi-3.5-mini-instruct", tmp_path / "t", layers=1, vision_layers=2)
    with pytest.raises(CheckpointError, match="heads"):
        create_random(PHI35_VISION, tmp_path / "v", layers=1, hidden=64, heads=2, vision_hidden=30, vision_heads=4)


def test_text_checkpoints_load_strictly(tiny_phi3, tiny_moe):
    for folder, head_dim in ((tiny_phi3, 96 // 6), (tiny_moe, 64 // 4)):
        raw = raw_config(folder)
        assert raw[RANDOM_MARKER] is True
        rs = raw["rope_scaling"]
        assert len(rs["short_factor"]) == len(rs["long_factor"]) == head_dim // 2
        load_causal_lm(folder, load_config(folder), torch.float32)
    keys = set(read_state_dict(tiny_moe))
    assert "model.layers.1.block_sparse_moe.experts.15.w2.weight" in keys  # Microsoft's per-expert names
    assert not any(k.endswith(".experts.w1") for k in keys)


def test_example_image():
    path = example_image()
    assert path.is_file() and path.stat().st_size < 60_000
    with Image.open(path) as im:
        assert im.size == CHART_SIZE and im.mode == "RGB"
    a, b = draw_example_chart(), draw_example_chart()
    assert a.size == CHART_SIZE and a.tobytes() == b.tobytes()
    out = ImageProcessor(num_crops=4)(path)
    assert out["pixel_values"].shape == (1, 5, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[672, 672]] and out["num_img_tokens"] == [757]


def test_example_image_copy(tmp_path):
    copy = example_image(tmp_path / "sub" / "chart.png")
    assert copy.read_bytes() == example_image().read_bytes()


def test_example_image_through_random_vision_checkpoint(tiny_vision):
    model, tok = load(tiny_vision), Tokenizer.from_dir(tiny_vision)
    processor = ImageProcessor.from_dir(tiny_vision)
    assert processor.num_crops == 4  # from the copied preprocessor_config.json
    prompt = "<|user|>\n<|image_1|>\nHow much rain fell in March?<|end|>\n<|assistant|>\n"
    logits = []
    for image in (example_image(), Image.new("RGB", CHART_SIZE, "white")):
        images = processor(image)
        ids = torch.tensor([tokenize_with_images(tok, prompt, images["num_img_tokens"])])
        assert int((ids == -1).sum()) == 757
        with torch.no_grad():
            x = model.embed(ids, images["pixel_values"], images["image_sizes"])
            logits.append(model(inputs_embeds=x)[0, -1])
    assert logits[0].shape == (32064,) and torch.isfinite(logits[0]).all()
    assert (logits[0] - logits[1]).abs().max() > 1e-3  # the image reaches the logits


def test_reference_phi3_vision_names_and_shapes():
    require_shared()
    raw = raw_config(PHI3_VISION)
    with torch.device("meta"):
        model = build_model(config_from_dict(raw), raw)
    index = json.loads((PHI3_VISION / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == set(index) - {TIED_WTE}
    vis = "model.vision_embed_tokens."
    assert shapes["model.embed_tokens.weight"] == (32064, 3072)
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (9216, 3072)
    assert shapes["model.layers.31.mlp.gate_up_proj.weight"] == (16384, 3072)
    assert shapes[vis + "img_projection.0.weight"] == (3072, 4096)
    assert shapes[vis + "img_projection.2.weight"] == (3072, 3072)
    assert shapes[vis + "glb_GN"] == (1, 1, 4096) and shapes[vis + "sub_GN"] == (1, 1, 1, 4096)
    assert shapes[vis + "img_processor.vision_model.embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert shapes[vis + "img_processor.vision_model.embeddings.position_embedding.weight"] == (577, 1024)

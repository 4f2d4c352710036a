"""Parity of the CLIP tower + HD merge + projector against the reference's golden fixtures (tiny random models)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from phi3v.errors import CheckpointError, InputError
from phi3v.processing.image import num_image_tokens
from phi3v.models.clip import CLIPVisionConfig
from phi3v.models.phi3_v import ImageEmbeddingConfig, Phi3ImageEmbedding

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "phi3v"
REAL = SHARED / "reference" / "Phi-3-vision-128k-instruct"
PREFIX = "model.vision_embed_tokens."
CASES = {"A1": ("phi3_vision_tiny", "A1_landscape_640x480"), "B1": ("phi35_vision_tiny", "B1_single_800x600")}

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures not found at {FIXTURES}")


def load_embedding(model_dir: Path) -> Phi3ImageEmbedding:
    cfg = ImageEmbeddingConfig.from_config(json.loads((model_dir / "config.json").read_text()))
    with torch.device("meta"):
        emb = Phi3ImageEmbedding(cfg)
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        # bf16 -> fp32 is exact, and the reference ran on exactly these upcast values
        sd = {k[len(PREFIX):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(PREFIX)}
    emb.load_state_dict(sd, strict=True, assign=True)
    return emb


def load_case(key: str) -> tuple[Phi3ImageEmbedding, dict[str, torch.Tensor]]:
    model, case = CASES[key]
    with safe_open(FIXTURES / model / case / "tensors.safetensors", "pt") as f:
        wanted = ("pixel_values", "image_sizes", "clip_patch_features", "image_features_proj.")
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted)}
    return load_embedding(FIXTURES / model), tensors


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got - want).abs().max().item()
    print(f"{name}: max abs diff {diff:.3e} (max |ref| {want.abs().max().item():.2f})")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: max abs diff {diff:.3e}\n{m}")


def test_clip_features_match_reference():
    emb, t = load_case("B1")
    h, w = t["image_sizes"][0].tolist()
    n_real = 1 + (h // 336) * (w // 336)
    got = emb.img_features(t["pixel_values"][0, :n_real])
    assert got.shape == (n_real, 576, 64)
    assert_close("B1 clip hidden_states[-2][:, 1:]", got, t["clip_patch_features"][:n_real])


@pytest.mark.parametrize("key", sorted(CASES))
def test_image_features_match_reference(key):
    emb, t = load_case(key)
    out = emb(t["pixel_values"], t["image_sizes"])
    assert len(out) == t["image_sizes"].shape[0]
    for k, feats in enumerate(out):
        h, w = t["image_sizes"][k].tolist()
        assert feats.shape[0] == num_image_tokens(h, w, 336, 14)
        assert_close(f"{key} image_features_proj.{k}", feats, t[f"image_features_proj.{k}"])


def test_padding_crops_are_ignored():
    emb, t = load_case("A1")  # 3x4 grid: crops 13..16 are zero padding
    pv = t["pixel_values"].clone()
    pv[0, 13:] = torch.randn_like(pv[0, 13:])
    got, want = emb(pv, t["image_sizes"])[0], emb(t["pixel_values"], t["image_sizes"])[0]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(InputError):
        emb(pv, torch.tensor([[1344, 1680]]))  # 4x5 = 20 crops do not fit in 17


def test_num_image_tokens_matches_every_case():
    manifests = [json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*/*/manifest.json"))]
    with_images = [m for m in manifests if m.get("image_sizes")]  # A5 is text-only
    sizes = [(hw, n, m["case"]) for m in with_images for hw, n in zip(m["image_sizes"], m["num_img_tokens"])]
    assert len(sizes) == 13  # every image of every case
    for (h, w), n, case in sizes:
            assert num_image_tokens(h, w, 336, 14) == n, case


def real_shapes(H: int) -> dict[str, tuple[int, ...]]:
    """Shapes the real checkpoint implies: CLIP ViT-L/14-336 (C 1024, MLP 4096, 24 layers), decoder width H."""
    C, I, L = 1024, 4096, 24
    shapes = {
        "glb_GN": (1, 1, 4 * C),
        "sub_GN": (1, 1, 1, 4 * C),
        "img_projection.0.weight": (H, 4 * C), "img_projection.0.bias": (H,),
        "img_projection.2.weight": (H, H), "img_projection.2.bias": (H,),
    }
    vm = "img_processor.vision_model."
    shapes |= {
        vm + "embeddings.class_embedding": (C,),
        vm + "embeddings.patch_embedding.weight": (C, 3, 14, 14),
        vm + "embeddings.position_embedding.weight": ((336 // 14) ** 2 + 1, C),
    }
    for ln in ("pre_layrnorm", "post_layernorm"):
        shapes |= {vm + f"{ln}.weight": (C,), vm + f"{ln}.bias": (C,)}
    for i in range(L):
        p = vm + f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {p + f"self_attn.{proj}.weight": (C, C), p + f"self_attn.{proj}.bias": (C,)}
        for ln in ("layer_norm1", "layer_norm2"):
            shapes |= {p + f"{ln}.weight": (C,), p + f"{ln}.bias": (C,)}
        shapes |= {p + "mlp.fc1.weight": (I, C), p + "mlp.fc1.bias": (I,)}
        shapes |= {p + "mlp.fc2.weight": (C, I), p + "mlp.fc2.bias": (C,)}
    return shapes


@pytest.mark.skipif(not REAL.is_dir(), reason="real Phi-3-vision config not found")
def test_parameters_match_real_checkpoint():
    config = json.loads((REAL / "config.json").read_text())
    cfg = ImageEmbeddingConfig.from_config(config)
    assert cfg.vision == CLIPVisionConfig()  # no vision_config in the real config.json: CLIP ViT-L/14-336
    assert cfg.num_layers_run == 23  # hidden_states[-2]: the last of the 24 layers is never run
    with torch.device("meta"):
        emb = Phi3ImageEmbedding(cfg)
    weight_map = json.loads((REAL / "model.safetensors.index.json").read_text())["weight_map"]
    ckpt = {k[len(PREFIX):] for k in weight_map if k.startswith(PREFIX)} - {"wte.weight"}
    ours = {k: tuple(v.shape) for k, v in emb.state_dict().items()}
    assert set(ours) == ckpt
    assert ours == real_shapes(config["hidden_size"])


@pytest.mark.parametrize("key, value", [
    ("hd_transform_order", "glb_sub"), ("use_hd_transform", False), ("with_learnable_separator", False),
    ("projection_cls", "linear"), ("embedding_cls", "audio"),
])
def test_unsupported_config_raises(key, value):
    config = json.loads((FIXTURES / "phi3_vision_tiny" / "config.json").read_text())
    config["embd_layer"][key] = value
    with pytest.raises(CheckpointError, match=key):
        ImageEmbeddingConfig.from_config(config)


def test_unsupported_img_processor_raises():
    config = json.loads((FIXTURES / "phi3_vision_tiny" / "config.json").read_text())
    for key, value in [("type_feature", "cls_patch"), ("image_dim_out", 32), ("num_img_tokens", 576), ("layer_idx", 5)]:
        bad = json.loads(json.dumps(config))
        bad["img_processor"][key] = value
        with pytest.raises(CheckpointError):
            ImageEmbeddingConfig.from_config(bad)


def test_backward_gives_finite_grads():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                              image_size=56)
    cfg = ImageEmbeddingConfig(hidden_size=48, image_dim_out=32, num_img_tokens=4, vision=vision)
    emb = Phi3ImageEmbedding(cfg)
    for p in emb.parameters():
        torch.nn.init.normal_(p, std=0.1)
    out = emb(torch.randn(2, 5, 3, 56, 56), torch.tensor([[56, 112], [112, 112]]))
    assert [o.shape for o in out] == [(num_image_tokens(56, 112, 56, 14), 48), (num_image_tokens(112, 112, 56, 14), 48)]
    sum(o.square().mean() for o in out).backward()
    vm = emb.img_processor.vision_model
    for name, p in [("img_projection.0", emb.img_projection[0].weight), ("glb_GN", emb.glb_GN), ("sub_GN", emb.sub_GN),
                    ("patch_embedding", vm.embeddings.patch_embedding.weight)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert vm.encoder.layers[-1].mlp.fc1.weight.grad is None and vm.post_layernorm.weight.grad is None  # not run

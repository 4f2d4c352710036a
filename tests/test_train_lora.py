"""LoRA / QLoRA adapters: only adapters train, merge = unmerged (fp32), QLoRA over int8/int4, the CLIP layers the
model never runs stay unwrapped, and adapters are saved in peft's layout that peft itself reads (and vice versa)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import phi3v
from phi3v.checkpoint.random import create_random
from phi3v.errors import CheckpointError, InputError
from phi3v.quant.layers import WeightOnlyInt4Linear, WeightOnlyInt8Linear, quantize_model
from phi3v.train.lora import (
    CLIP_TARGETS, DECODER_TARGETS, PROJECTOR_TARGETS, LoRALinear, adapter_state_dict, apply_lora, disable_adapters,
    load_adapter, lora_layers, merge_lora, remove_lora, save_adapter, unmerge_lora,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MINI, VISION = SHARED / "reference" / "Phi-3.5-mini-instruct", SHARED / "reference" / "Phi-3.5-vision-instruct"
SIZES = dict(layers=2, hidden=64, heads=4, intermediate=96, dtype="float32")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return create_random(MINI, tmp_path_factory.mktemp("lora_text"), seed=5, std=0.1, **SIZES)


@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory) -> Path:
    """Wider random weights: logits that can fit a batch in a dozen steps."""
    return create_random(MINI, tmp_path_factory.mktemp("lora_fit"), seed=5, std=0.3, **SIZES)


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory) -> Path:
    return create_random(VISION, tmp_path_factory.mktemp("lora_vision"), seed=6, std=0.1, **SIZES)


def load(path):
    return phi3v.load(path, dtype="float32").model


def batch(n=4, T=16, seed=0):
    return torch.randint(0, 64, (n, T), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def fit(model, ids, steps=12, lr=2e-2):
    """A minimal loop over one fixed batch: (first loss, last loss)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def randomize(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(std * torch.randn(m.lora_B.weight.shape, generator=g))


def frozen_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def test_lora_halves_the_loss_with_only_adapters_changing(fit_dir):
    torch.manual_seed(0)
    model, ids = load(fit_dir), batch()
    with torch.no_grad():
        before = model(ids)
    names = apply_lora(model, DECODER_TARGETS, r=4, alpha=8)
    assert names == [f"model.layers.{i}.{p}" for i in range(2)
                     for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # B = 0: a new adapter changes nothing
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    # r (K + N) per layer: qkv 64->192, o 64->64, gate_up 64->192, down 96->64
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 4 * (256 + 128 + 256 + 160)
    frozen = frozen_state(model)
    first, last = fit(model, ids)
    assert last < first / 2, (first, last)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # base weights bit-identical
    assert all(not torch.equal(m.lora_B.weight, torch.zeros_like(m.lora_B.weight)) for m in lora_layers(model).values())


def test_merge_equals_unmerged_and_unmerge_restores(text_dir):
    torch.manual_seed(1)
    model, ids = load(text_dir), batch(2, 32, seed=1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, DECODER_TARGETS, r=8, alpha=16)
    randomize(model)
    with torch.no_grad():
        unmerged = model(ids)
        assert merge_lora(model) == 8
        merged = model(ids)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
        assert not torch.equal(model.model.layers[0].self_attn.qkv_proj.base_layer.weight,
                               base["model.layers.0.self_attn.qkv_proj.weight"])
        unmerge_lora(model)
        torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=0)
        w = model.model.layers[1].mlp.down_proj.base_layer.weight
        torch.testing.assert_close(w, base["model.layers.1.mlp.down_proj.weight"], atol=1e-6, rtol=0)
        plain = remove_lora(model)  # merged back into plain nn.Linear under the checkpoint's names
        assert set(plain.state_dict()) == set(base) and not lora_layers(plain)
        torch.testing.assert_close(plain(ids), unmerged, atol=1e-5, rtol=0)


def test_disable_adapters_gives_the_base_model(text_dir):
    model, ids = load(text_dir), batch(2, 16, seed=2)
    with torch.no_grad():
        base = model(ids)
        apply_lora(model, ["o_proj", "down_proj"], r=4, alpha=4)
        randomize(model, std=0.2)
        adapted = model(ids)
        assert (adapted - base).abs().max() > 1e-3
        with disable_adapters(model):
            assert torch.equal(model(ids), base)
        assert torch.equal(model(ids), adapted)
        merge_lora(model)  # merged adapters are unmerged inside the block and merged again after it
        with disable_adapters(model):
            torch.testing.assert_close(model(ids), base, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=0)
        assert all(m.merged for m in lora_layers(model).values())


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_qlora_trains_on_quantized_weights(fit_dir, scheme):
    torch.manual_seed(2)
    model, ids = load(fit_dir), batch(seed=3)
    quantize_model(model, scheme, group_size=32)
    kind = WeightOnlyInt4Linear if scheme == "int4" else WeightOnlyInt8Linear
    names = apply_lora(model, DECODER_TARGETS, r=4, alpha=8)
    assert all(isinstance(m.base_layer, kind) for m in lora_layers(model).values()) and len(names) == 8
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    frozen = frozen_state(model)  # int weights, scales and the float norms/embeddings
    first, last = fit(model, ids)
    assert last < first / 2, (first, last)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    layer = model.model.layers[0].self_attn.qkv_proj
    assert layer.base_layer.weight.dtype == (torch.uint8 if scheme == "int4" else torch.int8)
    x = torch.randn(3, 64)  # the kernel path (no grad, 3 rows) equals the on-the-fly dequantized one
    with torch.no_grad():
        kernel = layer(x)
    torch.testing.assert_close(layer(x.requires_grad_()), kernel, atol=1e-4, rtol=1e-4)
    assert merge_lora(model) == 0  # quantized bases take no merge: the adapters stay active


def test_vision_targets_skip_the_unused_clip_layers(vision_dir):
    model = load(vision_dir)
    emb = model.model.vision_embed_tokens
    run = emb.cfg.num_layers_run  # the tiny CLIP has 3 layers, layer_idx -2: layers 0 and 1 run, layer 2 never
    assert (run, len(emb.img_processor.vision_model.encoder.layers)) == (2, 3)
    names = apply_lora(model, PROJECTOR_TARGETS + CLIP_TARGETS, r=2, alpha=2)
    clip = "model.vision_embed_tokens.img_processor.vision_model.encoder.layers"
    want = ["model.vision_embed_tokens.img_projection.0", "model.vision_embed_tokens.img_projection.2"]
    want += [f"{clip}.{i}.{p}" for i in range(run)
             for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "mlp.fc1", "mlp.fc2")]
    assert sorted(names) == sorted(want)
    # every wrapped layer is used: each adapter's B gets a gradient from an image's features
    randomize(model, std=0.0)
    pixels = torch.randn(1, 2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    feats = emb(pixels, torch.tensor([[336, 336]]))
    feats[0].square().mean().backward()
    assert all(m.lora_B.weight.grad is not None and m.lora_B.weight.grad.abs().sum() > 0
               for m in lora_layers(model).values())


def test_unknown_target_and_double_wrap_are_user_errors(text_dir):
    model = load(text_dir)
    with pytest.raises(InputError, match="matches no linear layer"):
        apply_lora(model, ["fc1"])  # a CLIP target on a text model
    apply_lora(model, ["o_proj"])
    with pytest.raises(InputError, match="already has LoRA"):
        apply_lora(model, ["o_proj"])
    with pytest.raises(InputError, match="nn.Linear"):
        LoRALinear.from_base(model.model.norm, 4, 4)


def test_save_and_load_adapter_in_peft_layout(text_dir, tmp_path):
    ids = batch(2, 20, seed=4)
    model = load(text_dir)
    apply_lora(model, ["qkv_proj", "down_proj"], r=4, alpha=12)
    randomize(model, std=0.1)
    with torch.no_grad():
        want = model(ids)
    out = save_adapter(model, tmp_path / "adapter", base_model=str(text_dir))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["task_type"]) == ("LORA", 4, 12, "CAUSAL_LM")
    assert cfg["target_modules"] == sorted(f"model.layers.{i}.{p}" for i in range(2)
                                           for p in ("self_attn.qkv_proj", "mlp.down_proj"))
    keys = set(adapter_state_dict(model))
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in keys and len(keys) == 8
    fresh = load(text_dir)
    assert sorted(load_adapter(fresh, out)) == cfg["target_modules"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), want, atol=0, rtol=0)
    merged = load(text_dir)
    load_adapter(merged, out, merge=True)
    assert all(m.merged for m in lora_layers(merged).values())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), want, atol=1e-5, rtol=0)


def test_adapter_errors_say_what_to_do(text_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not an adapter folder"):
        load_adapter(load(text_dir), tmp_path)
    other = create_random(MINI, tmp_path / "wide", seed=7, layers=2, hidden=128, heads=4, intermediate=96,
                          dtype="float32")
    model = load(other)
    apply_lora(model, ["o_proj"], r=2, alpha=2)
    save_adapter(model, tmp_path / "wide_adapter")
    with pytest.raises(CheckpointError, match="another model size"):
        load_adapter(load(text_dir), tmp_path / "wide_adapter")


def test_peft_reads_our_adapter_and_we_read_peft(text_dir, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ids = batch(2, 20, seed=5)
    ours = load(text_dir)
    apply_lora(ours, DECODER_TARGETS, r=4, alpha=8)
    randomize(ours, std=0.1)
    save_adapter(ours, tmp_path / "ours")
    ref = transformers.AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)
        # the other way: an adapter trained with peft (B made nonzero) loads into phi3v with the same logits
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        ref.save_pretrained(tmp_path / "theirs")
        mine = load(text_dir)
        load_adapter(mine, tmp_path / "theirs")
        torch.testing.assert_close(mine(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_qlora_recipe_quantizes_only_the_adapted_layers(fit_dir):
    from torch import nn

    from phi3v.train.config import TrainConfig
    from phi3v.train.tuning import attach_adapters

    cfg = TrainConfig(model="m", data="d", lora_r=4, lora_targets=["o_proj", "down_proj"], qlora="int4",
                      qlora_group_size=32, seed=3)
    model = load(fit_dir)
    names = attach_adapters(model, cfg)
    assert names == [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")]
    assert all(isinstance(m.base_layer, WeightOnlyInt4Linear) for m in lora_layers(model).values())
    layer = model.model.layers[0]
    assert type(layer.self_attn.qkv_proj) is nn.Linear and type(model.lm_head) is nn.Linear  # float, frozen
    again = load(fit_dir)
    attach_adapters(again, cfg)  # the seed fixes A's init
    assert torch.equal(again.model.layers[0].mlp.down_proj.lora_A.weight, layer.mlp.down_proj.lora_A.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the int4 kernels have no backward: the adapters dequantize
        loss = lm_loss(model, batch(2, 8))
    loss.backward()
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for m in lora_layers(model).values())


def test_recipe_flags_are_checked():
    from phi3v.train.config import TrainConfig

    with pytest.raises(InputError, match="--lora-r"):
        TrainConfig(model="m", data="d", qlora="int8").check()
    with pytest.raises(InputError, match="only the adapters train"):
        TrainConfig(task="pretrain", model="m", data="d", lora_r=4, stages="projector:2").check()

"""fbgemm's int8 GEMM behind the int8 layers' bf16 CPU forward (phi3v.quant.cpu_int8): values against the
dequantized float32 matmul (16-bit activations) and against the 8-bit rounding of the inputs (8-bit activations),
every row count through the packed GEMM, the activation bits of decoder and vision layers, the memory-mapped
weight's pages given back, re-packing after a load, the fallback, and the int8 vision tower against the fp32
golden fixtures."""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from phi3v.checkpoint.load import load_causal_lm
from phi3v.checkpoint.quantized import quantize_checkpoint
from phi3v.checkpoint.safetensors import SafetensorsFile, save_file
from phi3v.hardware import release_pages
from phi3v.models import config_from_dict
from phi3v.quant import cpu_int8, native
from phi3v.quant.layers import (
    DECODER_ACTIVATION_BITS, VISION_ACTIVATION_BITS, WeightOnlyInt8Linear, pack_for_kernels, quantize_int8,
    quantize_model,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "phi3v"
needs_fbgemm = pytest.mark.skipif(not cpu_int8.available(), reason="this PyTorch has no fbgemm engine")


def rel_err(got, ref):
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


# Without VNNI fbgemm takes 7-bit activations (cpu_int8.reduce_range: vpmaddubsw's int16 pairs would saturate
# otherwise), half the levels of each pass: the bounds below are 4x (two passes) or 2x (one pass) wider there.
COARSE = 2 if cpu_int8.reduce_range() else 1


def int8_weight(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_int8(0.2 * torch.randn(N, K, generator=g), torch.bfloat16)


@needs_fbgemm
@pytest.mark.parametrize("M", [1, 3, 16, 200])  # one row, a few rows, many rows
@pytest.mark.parametrize("K,N", [(2, 1), (97, 33), (256, 512)])
def test_matmul_is_the_dequantized_matmul(M, K, N):
    q, s = int8_weight(N, K)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g)
    x[0, -1] = 30.0  # an outlier: per-row scales keep the other rows exact
    ref = x @ (q.float() * s.float()[:, None]).T
    got = cpu_int8.matmul(x, cpu_int8.prepack(q, s))
    assert got.dtype == torch.float32
    assert rel_err(got, ref) < 3e-4 * COARSE**2  # ~16-bit activations; one 8-bit pass alone is ~1e-2
    if M > 1:
        assert rel_err(got[1:], ref[1:]) < 5e-5 * COARSE**2
    assert torch.equal(cpu_int8.matmul(torch.zeros(M, K), cpu_int8.prepack(q, s)), torch.zeros(M, N))


@needs_fbgemm
@pytest.mark.parametrize("M", [1, 5, 300])
def test_8_bit_activations_are_each_rows_8_bit_rounding(M):
    """bits=8: the product of every row's own 8-bit rounding (254 levels over its largest magnitude) with the
    weight, exactly as integer arithmetic gives it; an outlier row costs the other rows nothing."""
    K, N = 256, 96
    q, s = int8_weight(N, K)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=g)
    if M > 1:
        x[0, 0] = 40.0  # an outlier row
    qmax = 127 if cpu_int8.reduce_range() else 255
    amax = x.abs().amax(1, keepdim=True)
    levels = (qmax - 1) // 2
    x8 = (x / amax * levels).round() * amax / levels  # the 8-bit rounding per row
    w = q.float() * s.float()[:, None]
    got = cpu_int8.matmul(x, cpu_int8.prepack(q, s), bits=8)
    ref8, exact = x8.double() @ w.double().T, x.double() @ w.double().T
    assert rel_err(got, ref8.float()) < 2e-3  # a rare tie rounded the other way moves one level of one element
    clean = slice(1 if M > 1 else 0, None)  # the rows without the outlier
    err = rel_err(got[clean], exact[clean].float())
    assert 1e-4 < err < 2e-2  # really 8-bit (the 16-bit path is ~1e-5), about 0.4% of a row's range
    with pytest.raises(ValueError, match="8 or 16"):
        cpu_int8.matmul(x, cpu_int8.prepack(q, s), bits=4)


@needs_fbgemm
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("M", [1, 6, 300])
def test_the_given_grid_is_linear_dynamics_own(M, bits, monkeypatch):
    """The GEMM is handed fbgemm's grid for [-1, 1] instead of finding it (no min/max pass): the results are those
    of linear_dynamic on the same rows with the pin row, bit for bit, for float32 and bf16 inputs."""
    def both(x, packed, bits):  # float32 in and out; bf16 in and out
        return [cpu_int8.matmul(x, packed, bits=bits),
                cpu_int8.matmul(x.bfloat16(), packed, bits=bits, out_dtype=torch.bfloat16)]

    K, N = 130, 70
    q, s = int8_weight(N, K, seed=3)
    packed = cpu_int8.prepack(q, s)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(M, K, generator=g)
    x[0, 5] = -25.0
    got = both(x, packed, bits)
    monkeypatch.setattr(cpu_int8, "_gemm", lambda z, rows, p: torch.ops.quantized.linear_dynamic(
        z, p, cpu_int8.reduce_range())[:rows])
    want = both(x, packed, bits)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(want[0], x @ (q.float() * s.float()[:, None]).T)  # rounded activations: not the float product


@needs_fbgemm
def test_prepack_unpack_round_trip():
    q, s = int8_weight(40, 64)
    q2, s2 = cpu_int8.unpack(cpu_int8.prepack(q, s))
    assert torch.equal(q2, q) and torch.equal(s2, s.float())


@needs_fbgemm
@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("M", [1, 7, 16, 300])
def test_int8_linear_runs_the_packed_gemm_at_every_row_count(M, bits):
    g = torch.Generator().manual_seed(M)
    lin = nn.Linear(128, 96, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 128, generator=g) / 11)
        lin.bias.copy_(torch.randn(96, generator=g) / 11)
    layer = WeightOnlyInt8Linear.from_linear(lin, activation_bits=bits, native=False)  # (native: test_native_kernels)
    assert layer.packed is not None
    x = torch.randn(M, 128, generator=g).to(torch.bfloat16)
    w = layer.weight.float() * layer.scales.float()[:, None]
    ref = x.float() @ w.T + layer.bias.float()
    got = layer(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) < (8e-3 if bits == 16 else 2e-2 * COARSE)
    expect = cpu_int8.matmul(x, layer.packed, bits).to(torch.bfloat16) + layer.bias
    assert torch.equal(got, expect)


@needs_fbgemm
def test_a_loaded_int8_model_packs_every_layer_with_its_bits(tmp_path):
    """After loading a saved int8 checkpoint every int8 layer runs the packed copy: decoder layers with 16-bit
    activations, the vision tower's and projector's with 8-bit; the weights mapped from the file stay readable
    (saving, LoRA) and equal to the file's."""
    q = tmp_path / "q"
    quantize_checkpoint(FIXTURES / "phi35_vision_tiny", q, "int8")
    raw = json.loads((q / "config.json").read_text())
    model = load_causal_lm(q, config_from_dict(raw), torch.bfloat16, raw=raw)
    seen = {"decoder": 0, "vision": 0}
    stored = SafetensorsFile(q / "model.safetensors")
    for name, m in model.named_modules():
        if isinstance(m, WeightOnlyInt8Linear):
            part = "vision" if name.startswith("model.vision_embed_tokens.") else "decoder"
            assert m.activation_bits == {"vision": VISION_ACTIVATION_BITS, "decoder": DECODER_ACTIVATION_BITS}[part]
            # the decoder's 8-bit layers run phi3v's int8 kernel where it is built, the rest fbgemm's
            on_native = part == "decoder" and m.activation_bits == 8 and native.ops() is not None
            assert (m.native_packed is not None, m.packed is not None) == (on_native, not on_native)
            seen[part] += 1
            assert torch.equal(m.weight, stored.get(f"{name}.weight"))
    assert seen["decoder"] > 0 and seen["vision"] > 0


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads /proc/self/statm (Linux)")
def test_release_pages_gives_a_mapped_tensors_memory_back_and_keeps_its_values(tmp_path):
    n = 64 << 20
    data = torch.arange(n, dtype=torch.int64).to(torch.int8)
    save_file({"a": torch.ones(3, dtype=torch.int8), "w": data}, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    w = f.get("w")
    assert int(w.sum()) == int(data.sum())  # every page touched: resident
    before = rss_bytes()
    released = release_pages(w)
    after = rss_bytes()
    assert released >= n - 2 * 4096 and before - after >= n - (4 << 20)
    assert torch.equal(w, data) and torch.equal(f.get("a"), torch.ones(3, dtype=torch.int8))  # read again
    plain = data.clone()
    assert release_pages(plain) == 0 and torch.equal(plain, data)  # not a mapped file's: left alone


@needs_fbgemm
def test_float32_layers_keep_the_exact_kernel():
    layer = WeightOnlyInt8Linear.from_linear(nn.Linear(64, 32))
    assert layer.packed is None
    x = torch.randn(40, 64)
    assert rel_err(layer(x), x @ (layer.weight.float() * layer.scales[:, None]).T + layer.bias) < 1e-6


@needs_fbgemm
@pytest.mark.parametrize("use_native", [False, True])
def test_a_load_drops_the_stale_pack_and_pack_for_kernels_rebuilds_it(use_native):
    if use_native and native.ops() is None:
        pytest.skip("phi3v's C++ kernels could not be built here")
    a = WeightOnlyInt8Linear.from_linear(nn.Linear(64, 48, bias=False).to(torch.bfloat16), native=use_native)
    b = WeightOnlyInt8Linear.from_linear(nn.Linear(64, 48, bias=False).to(torch.bfloat16), native=use_native)
    x = torch.randn(32, 64).to(torch.bfloat16)
    a.load_state_dict(b.state_dict())
    ref = x.float() @ (b.weight.float() * b.scales.float()[:, None]).T
    assert a.packed is None and a.native_packed is None and rel_err(a(x), ref) < 8e-3  # b's, the plain kernel
    a.native = use_native  # (pack_for_kernels sets it from the layer's name: this one has none)
    a.pack()
    assert (a.native_packed is not None) == use_native and (a.packed is not None) != use_native
    assert torch.equal(a(x), b(x))
    c = copy.deepcopy(a)
    assert torch.equal(c(x), a(x))


def test_without_fbgemm_the_layer_says_so_once_and_stays_correct(monkeypatch):
    monkeypatch.setattr(cpu_int8, "available", lambda: False)
    cpu_int8._fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = [WeightOnlyInt8Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16), native=False)
                  for _ in range(3)]
    cpu_int8._fallback.cache_clear()
    said = [w for w in caught if "fbgemm" in str(w.message)]
    assert len(said) == 1 and said[0].category is RuntimeWarning
    x = torch.randn(20, 64).to(torch.bfloat16)
    ref = x.float() @ (layers[0].weight.float() * layers[0].scales.float()[:, None]).T + layers[0].bias.float()
    assert layers[0].packed is None and rel_err(layers[0](x), ref) < 8e-3


# ---------------------------------------------------------------- int8 vision tower vs the fp32 golden fixtures

def image_features(model, case_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    golden = SafetensorsFile(case_dir / "tensors.safetensors")
    pv, sizes = golden.get("pixel_values"), golden.get("image_sizes")
    with torch.no_grad():
        got = model.model.vision_embed_tokens(pv, sizes)[0].float()
    return got, golden.get("image_features_proj.0").float()


@needs_fbgemm
@pytest.mark.parametrize("name,case", [("phi35_vision_tiny", "B1_single_800x600"),
                                       ("phi3_vision_tiny", "A1_landscape_640x480")])
def test_int8_vision_tower_against_fp32_golden(name, case):
    """CLIP + projector in int8 (fbgemm with 8-bit activations) stay close to the fp32 golden features."""
    d = FIXTURES / name
    raw = json.loads((d / "config.json").read_text())
    bf16 = load_causal_lm(d, config_from_dict(raw), torch.bfloat16, raw=raw)
    plain, ref = image_features(bf16, d / case)
    quantize_model(bf16, "int8")
    fc1 = bf16.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[0].mlp.fc1
    assert isinstance(fc1, WeightOnlyInt8Linear) and fc1.packed is not None
    got, _ = image_features(bf16, d / case)
    err_bf16, err_int8 = rel_err(plain, ref), rel_err(got, ref)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    print(f"{name}: image features vs fp32 golden, max rel err bf16 {err_bf16:.4f}, int8 {err_int8:.4f}, "
          f"min cosine {cos.min():.5f}")
    # 8-bit activations (VNNI CPUs) measured 0.033 / 0.030 (bf16: 0.008 / 0.007), cosine >= 0.9990; fbgemm's 7-bit
    # ones on CPUs without VNNI (measured by forcing reduce_range here) 0.042 / 0.046, cosine >= 0.9977
    bound, cos_min = (0.065, 0.997) if cpu_int8.reduce_range() else (0.045, 0.9985)
    assert err_bf16 < 0.01 and err_int8 < bound and cos.min() > cos_min

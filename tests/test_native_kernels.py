"""phi3v's C++ CPU kernels (phi3v.quant.native): compiled on first use and cached, values against float64,
every tail of K and N, and the PyTorch fallback when they are off."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phi3v.hardware import hugepages_on_request
from phi3v.inference.kernels import NATIVE_MAX_ROWS, BF16Linear
from phi3v.quant import native

needs_native = pytest.mark.skipif(native.ops() is None, reason="phi3v's C++ kernels could not be built here")


@needs_native
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("K,N", [(1, 1), (15, 3), (16, 4), (17, 5), (100, 37), (3072, 64)])
def test_bf16_gemv_is_float32_exact_products(M, K, N):
    """Every tail: K not a multiple of the SIMD width, N not of the 4-row blocks, M not of the 4-row passes."""
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    exact = x.double() @ w.double().T
    got = native.bf16_gemv(x, w)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    # float32 sums of exact products: a few float32 ulps of the sum of magnitudes
    bound = (x.double().abs() @ w.double().abs().T) * 2e-6 + 1e-30
    assert ((got.double() - exact).abs() <= bound).all()
    xb = x.to(torch.bfloat16)  # bf16 rows (vdpbf16ps where the CPU has AVX512_BF16): the same bound
    exact = xb.double() @ w.double().T
    got_b = native.bf16_gemv(xb, w)
    assert ((got_b.double() - exact).abs() <= (xb.double().abs() @ w.double().abs().T) * 2e-6 + 1e-30).all()
    # a row alone (its own loop where one bf16 row takes one weight row at a time, other blocks of weight rows on
    # AVX2) gets the same sums, bit for bit, as inside a batch: the tails past the last full vector included
    for rows, batch in ((x, got), (xb, got_b)):
        alone = torch.cat([native.bf16_gemv(rows[m:m + 1], w) for m in range(M)])
        assert torch.equal(alone, batch)


@needs_native
@pytest.mark.parametrize("M,K,N", [(1, 5, 3), (7, 300, 33), (13, 513, 70), (17, 256, 16), (200, 1000, 64),
                                   (193, 40, 31), (6, 3072, 96)])
def test_bf16_gemm_is_float32_exact_products(M, K, N):
    """The many-row kernel: tails of the row tiles (6 or 12), of the 8x8 transposes, of the 256-input panels, of
    the 16/32-column panels, and more rows than one pass (192)."""
    g = torch.Generator().manual_seed(M * 7 + K + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    got = native.bf16_gemm(x, w)
    bound = (x.double().abs() @ w.double().abs().T) * 2e-6 + 1e-30
    assert got.dtype == torch.float32 and ((got.double() - x.double() @ w.double().T).abs() <= bound).all()
    assert torch.equal(native.bf16_gemm(x.to(torch.bfloat16), w), native.bf16_gemm(x.to(torch.bfloat16).float(), w))


@needs_native
def test_on_avx2_many_rows_take_the_bf16_gemm(monkeypatch):
    """The "avx2" plan (no AVX-512): above NATIVE_MAX_ROWS rows the layer runs native.bf16_gemm; other plans don't."""
    lin = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    calls = []
    real = native.bf16_gemm
    monkeypatch.setattr(native, "bf16_gemm", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = BF16Linear.from_linear(lin, "avx2")(x)
        assert len(calls) == 1
        expect = (real(x.reshape(60, 64), lin.weight) + lin.bias.float()).to(torch.bfloat16).view(3, 20, 48)
        assert torch.equal(got, expect)
        BF16Linear.from_linear(lin, "emulated")(x)
    assert len(calls) == 1


@needs_native
def test_bf16_gemv_checks_its_inputs():
    w = torch.randn(8, 16).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="features"):
        native.bf16_gemv(torch.randn(1, 15), w)
    with pytest.raises(RuntimeError, match="contiguous bfloat16"):
        native.bf16_gemv(torch.randn(1, 8), w.T)
    with pytest.raises(RuntimeError, match="contiguous bfloat16"):
        native.bf16_gemv(torch.randn(1, 16), w.float())


@needs_native
@pytest.mark.parametrize("rows", [1, 3, NATIVE_MAX_ROWS, NATIVE_MAX_ROWS + 1])
def test_bf16_linear_takes_the_native_kernel_for_a_few_rows(rows, monkeypatch):
    lin = nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    layer = BF16Linear.from_linear(lin, "avx512_bf16")
    x = torch.randn(2, rows, 96).to(torch.bfloat16)
    calls = []
    real = native.bf16_gemv
    monkeypatch.setattr(native, "bf16_gemv", lambda a, b: calls.append(a.shape) or real(a, b))
    with torch.no_grad():
        got = layer(x)
    assert bool(calls) == (2 * rows <= NATIVE_MAX_ROWS)
    if calls:
        expect = (real(x.reshape(-1, 96), lin.weight) + lin.bias.float()).to(torch.bfloat16).view(2, rows, 40)
        assert torch.equal(got, expect)
    exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-2).all()


@needs_native
def test_with_grad_the_layer_runs_f_linear():
    """The C++ kernel has no backward: a training forward keeps PyTorch's differentiable kernels."""
    lin = nn.Linear(32, 8).to(torch.bfloat16)
    layer = BF16Linear.from_linear(lin, "avx512_bf16")
    x = torch.randn(1, 32).to(torch.bfloat16).requires_grad_()
    layer(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def test_off_runs_pytorch_and_a_failed_build_says_so_once(monkeypatch, tmp_path):
    monkeypatch.setenv("PHI3V_NATIVE", "0")
    native.ops.cache_clear()
    try:
        assert native.ops() is None and native.bf16_gemv(torch.randn(1, 4), torch.randn(2, 4).bfloat16()) is None
        lin = nn.Linear(16, 4).to(torch.bfloat16)
        x = torch.randn(1, 16).to(torch.bfloat16)
        assert torch.equal(BF16Linear.from_linear(lin, "avx512_bf16")(x), F.linear(x, lin.weight, lin.bias))
        monkeypatch.setenv("PHI3V_NATIVE", "1")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        native.ops.cache_clear()
        monkeypatch.setattr(native, "SOURCES", (native.SOURCES[0].with_name("missing.cpp"),))
        monkeypatch.setattr(native, "build_key", lambda: "missing")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.ops() is None and native.ops() is None  # cached: said once
        said = [w for w in caught if "C++ CPU kernels are unavailable" in str(w.message)]
        assert len(said) == 1 and said[0].category is RuntimeWarning
    finally:
        native.ops.cache_clear()


def test_the_build_is_cached_and_another_process_loads_it():
    """A second process finds the library built for this source, torch and CPU and loads it without compiling."""
    code = "from phi3v.quant import native; print(native.ops() is not None)"
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if first[0] != "True":
        pytest.skip("phi3v's C++ kernels could not be built here")
    built = sorted((native.cache_root() / native.build_key()).glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert again[0] == "True" and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


# ---------------------------------------------------------------- int4 x int8 GEMM

def int4_case(N, K, G, seed):
    from phi3v.quant.layers import quantize_int4

    g = torch.Generator().manual_seed(seed)
    return quantize_int4(0.05 * torch.randn(N, K, generator=g), G, torch.bfloat16)


def int4_reference(x, q, sz, G):
    """The kernel's arithmetic in float64: rows rounded to int8 (127 levels over their largest magnitude), times
    the dequantized weight."""
    from phi3v.quant.layers import dequantize_int4

    amax = x.double().abs().amax(1, keepdim=True)
    xq = torch.where(amax > 0, (x.double() / amax * 127).round() * amax / 127, 0.0)
    return xq @ dequantize_int4(q, sz, G).double().T


@needs_native
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 64])
@pytest.mark.parametrize("N,K,G", [(16, 32, 32), (48, 64, 32), (32, 256, 128), (80, 192, 64)])
def test_int4_matmul_is_int8_rows_times_the_dequantized_weight(M, N, K, G):
    """Odd and even numbers of 16-column blocks, every row tail, every group size; against float64."""
    q, sz = int4_case(N, K, G, seed=M + N + K)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g)
    x[0, 3] = 9.0  # an outlier: its row's scale only
    got = native.int4_matmul(x, native.int4_pack(q), native.int4_scales(sz), G)
    ref = int4_reference(x, q, sz, G)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    assert ((got.double() - ref).abs() <= ref.abs().amax() * 1e-5 + 1e-6).all()
    assert torch.equal(native.int4_matmul(torch.zeros(M, K), native.int4_pack(q), native.int4_scales(sz), G),
                       torch.zeros(M, N))


@needs_native
def test_int4_pack_layout():
    """Byte 4c + j of unit u: column c's input 8u + j in the low nibble, 8u + 4 + j in the high one."""
    N, K = 16, 16
    vals = torch.arange(N * K).reshape(N, K) % 16
    weight = (vals[:, 0::2] | (vals[:, 1::2] << 4)).to(torch.uint8)
    packed = native.int4_pack(weight)
    assert packed.shape == (1, 2, 64)
    for u in range(2):
        for c in range(16):
            for j in range(4):
                byte = int(packed[0, u, 4 * c + j])
                assert byte & 15 == vals[c, 8 * u + j] and byte >> 4 == vals[c, 8 * u + 4 + j]
    with pytest.raises(RuntimeError, match="multiple of 16"):
        native.int4_pack(weight[:8])


@needs_native
def test_int4_layer_runs_the_native_kernel_and_its_checkpoint_weight_is_kept():
    from phi3v.quant.layers import WeightOnlyInt4Linear, dequantize_int4

    lin = nn.Linear(256, 64, bias=True).to(torch.bfloat16)
    layer = WeightOnlyInt4Linear.from_linear(lin, group_size=64)
    assert layer.packed_for == "native" and layer.weight.shape == (64, 128)
    x = torch.randn(3, 256).to(torch.bfloat16)
    expect = native.int4_matmul(x, layer.packed, layer.native_sz, 64).to(torch.bfloat16) + layer.bias
    assert torch.equal(layer(x), expect)
    ref = int4_reference(x.float(), layer.weight, layer.scales_and_zeros, 64) + layer.bias.double()
    assert ((layer(x).double() - ref).abs() <= ref.abs().amax() * 2**-6).all()  # the output's and bias's roundings
    w = dequantize_int4(layer.weight, layer.scales_and_zeros, 64)
    step = layer.scales_and_zeros[..., 0].float().T.repeat_interleave(64, 1)
    assert ((w - lin.weight.float()).abs() <= step).all()


# ---------------------------------------------------------------- int8 x int8 GEMM

def int8_case(N, K, seed):
    from phi3v.quant.layers import quantize_int8

    g = torch.Generator().manual_seed(seed)
    q, s = quantize_int8(0.05 * torch.randn(N, K, generator=g), torch.bfloat16)
    q[0, :4] = torch.tensor([-128, 127, 0, -1], dtype=torch.int8)  # both ends of int8 (|q| = 128 on AVX2's path)
    return q, s.float()


def int8_reference(x, q, s):
    """Rows rounded to int8 (127 levels over their largest magnitude; x * (127 / amax) in float32 as the kernel
    rounds it, so that a tie of bf16 inputs goes the same way) times q * s, in float64."""
    import numpy as np

    x = x.float().numpy()
    amax = np.abs(x).max(1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0))  # IEEE float32, as in C++ (torch's
    xq = np.rint(x * inv)  # division by a tensor can differ by an ulp, and a tie like 28.499998 then rounds up)
    return torch.from_numpy(xq.astype(np.float64) * (amax / np.float32(127)).astype(np.float64)) @ (
        q.double() * s.double()[:, None]).T


@needs_native
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 64])
@pytest.mark.parametrize("N,K", [(16, 4), (48, 64), (80, 100), (96, 3072), (128, 520)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_is_int8_rows_times_the_dequantized_weight(M, N, K, dtype):
    """1, 2, 3, 5, 6 and 8 blocks of 16 columns (the tasks take 2 or 4 at a time, the rest one by one), every row
    tail, float32 and bf16 inputs, weights at -128 and 127; against float64."""
    q, s = int8_case(N, K, seed=M + N + K)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g)
    x[0, 3 % K] = 9.0  # an outlier: its row's scale only
    x = x.to(dtype)
    got = native.int8_matmul(x, native.int8_pack(q), s)
    ref = int8_reference(x.float(), q, s)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    assert ((got.double() - ref).abs() <= ref.abs().amax() * 1e-5 + 1e-6).all()
    assert torch.equal(native.int8_matmul(torch.zeros(M, K), native.int8_pack(q), s), torch.zeros(M, N))


@needs_native
def test_int8_pack_layout_and_checks():
    """Byte 4c + j of unit u is column c's input 4u + j; unpack gives the weight back; bad shapes are refused."""
    q = (torch.arange(32 * 8).reshape(32, 8) % 251 - 125).to(torch.int8)
    packed = native.int8_pack(q)
    assert packed.shape == (2, 2, 64)
    for b in range(2):
        for u in range(2):
            for c in range(16):
                assert packed[b, u, 4 * c:4 * c + 4].tolist() == q[16 * b + c, 4 * u:4 * u + 4].tolist()
    assert torch.equal(native.ops().int8_unpack(packed), q)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        native.int8_pack(q[:8])
    with pytest.raises(RuntimeError, match="features"):
        native.int8_matmul(torch.zeros(1, 12), packed, torch.ones(32))
    with pytest.raises(RuntimeError, match="float32"):
        native.int8_matmul(torch.zeros(1, 8), packed, torch.ones(32, dtype=torch.bfloat16))


@needs_native
def test_int8_layer_runs_the_native_kernel_in_the_decoder_and_fbgemm_in_the_vision_tower():
    """A decoder-side half-precision int8 layer runs the C++ kernel (its checkpoint weight kept); native=False
    (the vision tower's) and 16-bit activations keep fbgemm's packed copy; float32 layers keep the exact path."""
    from phi3v.quant import cpu_int8
    from phi3v.quant.layers import WeightOnlyInt8Linear

    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(256, 64, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 256, generator=g) / 16)
    layer = WeightOnlyInt8Linear.from_linear(lin)
    assert layer.native_packed is not None and layer.packed is None
    assert torch.equal(native.ops().int8_unpack(layer.native_packed), layer.weight)
    x = torch.randn(3, 256, generator=g).to(torch.bfloat16)
    expect = native.int8_matmul(x, layer.native_packed, layer.scales.float()).to(torch.bfloat16) + layer.bias
    assert torch.equal(layer(x), expect)
    ref = int8_reference(x.float(), layer.weight, layer.scales.float()) + layer.bias.double()
    assert ((layer(x).double() - ref).abs() <= ref.abs().amax() * 2**-6).all()  # the output's and bias's roundings
    layer.to(torch.bfloat16)  # casts the kernel's float32 scales too: they were bf16 values, the result is the same
    assert torch.equal(layer(x), expect)
    for kw in ({"native": False}, {"activation_bits": 16}):
        other = WeightOnlyInt8Linear.from_linear(lin, **kw)
        assert other.native_packed is None
        assert other.packed is not None or not cpu_int8.available()
    assert WeightOnlyInt8Linear.from_linear(nn.Linear(256, 64)).native_packed is None  # float32


# ---------------------------------------------------------------- row scaling around fbgemm's int8 GEMM

@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [2, 17, 64, 1000])
def test_scale_rows_in_and_out(dtype, K):
    g = torch.Generator().manual_seed(K)
    x = (torch.randn(5, K, generator=g) * torch.tensor([1.0, 100.0, 1e-3, 0.0, 3.0])[:, None]).to(dtype)
    z, amax = native.ops().scale_rows_in(x, 0.99)
    x32 = x.float()
    expect_amax = x32.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny)
    assert torch.equal(amax, expect_amax)
    assert z.shape == (6, K) and torch.equal(z[5, :2], torch.tensor([-1.0, 1.0])) and not z[5, 2:].any()
    ref = x32 * (0.99 / expect_amax.double()).float()[:, None]
    assert torch.allclose(z[:5], ref, rtol=2e-7, atol=0) and z[:5].abs().max() <= 0.99 * (1 + 1e-7)
    y = torch.randn(6, 7, generator=g)
    f = torch.rand(5, generator=g)
    out = native.ops().scale_rows_out(y, f, dtype)
    assert out.dtype == dtype and torch.equal(out, (y[:5] * f[:, None]).to(dtype))


@needs_native
def test_the_8_bit_int8_gemm_is_the_same_with_and_without_the_native_row_scaling(monkeypatch):
    from phi3v.quant import cpu_int8
    from phi3v.quant.layers import quantize_int8

    g = torch.Generator().manual_seed(0)
    q, s = quantize_int8(0.2 * torch.randn(48, 96, generator=g), torch.bfloat16)
    packed = cpu_int8.prepack(q, s)
    x = torch.randn(9, 96, generator=g).to(torch.bfloat16)
    fast = cpu_int8.matmul(x, packed, 8, torch.bfloat16)
    monkeypatch.setattr(cpu_int8.native, "ops", lambda: None)
    plain = cpu_int8.matmul(x, packed, 8, torch.bfloat16)
    assert fast.dtype == plain.dtype == torch.bfloat16
    # the same 8-bit grid; a row scale rounded differently may move a tie by one level
    assert ((fast.float() - plain.float()).abs() <= plain.float().abs().amax() * 2e-3).all()


VARIANT_CHECK = """
import torch
import torch.nn.functional as F
from phi3v.quant import native
from phi3v.quant.layers import dequantize_int4, quantize_int4
lib = native.ops()
assert lib is not None, "no build"
g = torch.Generator().manual_seed(0)
for M, K, N in ((1, 40, 7), (5, 100, 37), (9, 3072, 20)):
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    bound = (x.double().abs() @ w.double().abs().T) * 2e-6 + 1e-30
    assert ((lib.bf16_gemv(x, w).double() - x.double() @ w.double().T).abs() <= bound).all(), ("gemv", M, K, N)
for M, K, N in ((1, 40, 7), (13, 300, 37), (200, 520, 20)):
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    bound = (x.double().abs() @ w.double().abs().T) * 2e-6 + 1e-30
    assert ((lib.bf16_gemm(x, w).double() - x.double() @ w.double().T).abs() <= bound).all(), ("gemm", M, K, N)
for M, N, K, G in ((1, 16, 32, 32), (6, 48, 256, 128), (9, 80, 192, 64)):
    q, sz = quantize_int4(0.05 * torch.randn(N, K, generator=g), G, torch.bfloat16)
    x = torch.randn(M, K, generator=g)
    amax = x.double().abs().amax(1, keepdim=True)
    ref = ((x.double() / amax * 127).round() * amax / 127) @ dequantize_int4(q, sz, G).double().T
    got = lib.int4_matmul(x, native.int4_pack(q), native.int4_scales(sz), G)
    assert ((got.double() - ref).abs() <= ref.abs().amax() * 1e-5 + 1e-6).all(), ("int4", M, N, K, G)
for M, N, K in ((1, 16, 4), (6, 48, 64), (9, 80, 100)):
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, generator=g) / 100
    x = torch.randn(M, K, generator=g)
    amax = x.double().abs().amax(1, keepdim=True)
    ref = ((x.double() / amax * 127).round() * amax / 127) @ (q.double() * s.double()[:, None]).T
    got = lib.int8_matmul(x, native.int8_pack(q), s)
    assert ((got.double() - ref).abs() <= ref.abs().amax() * 1e-5 + 1e-6).all(), ("int8", M, N, K)
for B, nh, nkv, S, hd in ((1, 4, 4, 9, 8), (2, 6, 2, 33, 20)):
    k, v = (torch.randn(B, nkv, S, hd, generator=g).to(torch.bfloat16) for _ in range(2))
    q = torch.randn(B, nh, 1, hd, generator=g)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=nh != nkv)
    got = lib.decode_attention(q, k, v, None, hd ** -0.5)
    assert (got.double() - ref).abs().max() < 2e-6, ("attention", B, nh, nkv, S, hd)
x = torch.randn(3, 50, generator=g).to(torch.bfloat16)
z, amax = lib.scale_rows_in(x, 0.99)
assert torch.equal(amax, x.float().abs().amax(1)) and torch.allclose(z[:3], x.float() * 0.99 / amax[:, None], rtol=2e-7)
print("ok", int(lib.simd_lanes()))
"""


@pytest.mark.slow
@pytest.mark.parametrize("march,needs,lanes", [("haswell", ("avx2", "fma", "bmi2"), 8),
                                              ("haswell -mavxvnni", ("avx2", "fma", "bmi2", "avx_vnni"), 8),
                                              ("x86-64", (), 1)])
def test_the_avx2_and_scalar_variants_compute_the_same(march, needs, lanes, tmp_path):
    """The kernels built for other targets than this CPU's (AVX2 without AVX-512, with and without AVX-VNNI; no SIMD
    at all), checked against float64 in a process of their own: the variants an AVX2 laptop or an old machine
    would run. Each runs where this CPU can execute it."""
    from phi3v.hardware import cpu_flags

    if native.ops() is None:
        pytest.skip("phi3v's C++ kernels could not be built here")
    missing = [f for f in needs if f not in (cpu_flags() or ())]
    if missing:
        pytest.skip(f"this CPU cannot run the {march} build (no {', '.join(missing)})")
    env = dict(os.environ, PHI3V_NATIVE_MARCH=march, XDG_CACHE_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", VARIANT_CHECK], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", str(lanes)]


@needs_native
def test_a_loaded_int4_checkpoint_runs_the_native_kernel_and_keeps_its_file_weights(tmp_path):
    """A saved int4 checkpoint: every half-precision int4 layer runs the C++ kernel, its checkpoint tensors (whose
    pages were given back) still equal the file's, and the model's logits match those of a fresh quantization."""
    import json

    from phi3v.checkpoint.load import load_causal_lm
    from phi3v.checkpoint.quantized import quantize_checkpoint
    from phi3v.checkpoint.safetensors import SafetensorsFile
    from phi3v.models import config_from_dict
    from phi3v.quant.layers import WeightOnlyInt4Linear, quantize_model

    src = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "phi3v" / "phi35_vision_tiny"
    q = tmp_path / "q"
    quantize_checkpoint(src, q, "int4", group_size=32)
    raw = json.loads((q / "config.json").read_text())
    model = load_causal_lm(q, config_from_dict(raw), torch.bfloat16, raw=raw)
    stored = SafetensorsFile(q / "model.safetensors")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, WeightOnlyInt4Linear)]
    assert layers and all(m.packed_for == "native" for _, m in layers)
    for name, m in layers:
        assert torch.equal(m.weight, stored.get(f"{name}.weight"))
        assert torch.equal(m.scales_and_zeros, stored.get(f"{name}.scales_and_zeros"))
    raw_src = json.loads((src / "config.json").read_text())
    fresh = load_causal_lm(src, config_from_dict(raw_src), torch.bfloat16, raw=raw_src)
    quantize_model(fresh, "int4", group_size=32)
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916]])
    with torch.no_grad():
        assert torch.equal(model(ids)[0], fresh(ids)[0])


@needs_native
@pytest.mark.parametrize("B,nh,nkv,S,hd", [(1, 4, 4, 1, 8), (1, 32, 32, 70, 96), (3, 8, 2, 37, 40), (2, 6, 3, 17, 5)])
def test_decode_attention_is_float32_attention_on_the_bf16_cache(B, nh, nkv, S, hd):
    """One query per row against a slice of a longer bf16 cache (the engine's strides), grouped queries, a mask
    with holes per row and a fully masked row (zeros), head dims that are not a multiple of the SIMD width."""
    g = torch.Generator().manual_seed(B * 100 + S + hd)
    cache_k, cache_v = (torch.randn(B, nkv, S + 7, hd, generator=g).to(torch.bfloat16) for _ in range(2))
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    q = torch.randn(B, nh, 1, hd, generator=g).to(torch.bfloat16)
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.6
    mask[:, ..., 0] = True
    if B == 3:
        mask[2] = False
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=nh != nkv)
    ref = torch.nan_to_num(ref, nan=0.0)
    if B == 3:
        ref[2] = 0.0
    got = native.ops().decode_attention(q, k, v, mask, hd ** -0.5)
    assert got.dtype == torch.float32 and (got.double() - ref).abs().max() < 2e-6
    assert torch.equal(native.decode_attention(q, k, v, mask), got.to(torch.bfloat16))
    no_mask = native.ops().decode_attention(q, k, v, None, hd ** -0.5)
    full = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=nh != nkv)
    assert (no_mask.double() - full).abs().max() < 2e-6


@needs_native
def test_a_bf16_model_decodes_with_the_kernel_as_with_sdpa(tmp_path, monkeypatch):
    """phi3v.load installs the kernel; a bf16 decode step takes it in every layer (prefill does not) and its
    logits equal SDPA's on the same cache to bf16 rounding; float32 caches and gradients keep SDPA."""
    import phi3v
    from phi3v.checkpoint.random import create_random
    from phi3v.inference import kernels
    from phi3v.models.cache import KVCache
    from phi3v.models.layers import Attention

    ref_dir = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "Phi-3.5-mini-instruct"
    create_random(ref_dir, tmp_path / "m", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, seed=0)
    m = phi3v.load(tmp_path / "m", dtype="bfloat16").model
    attn = [x for x in m.modules() if isinstance(x, Attention)]
    assert len(attn) == 2 and all(a.decode_kernel is kernels._decode_attention for a in attn)
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(1) or real(*a))
    ids = torch.tensor([[5, 17, 300, 9, 41, 2]])

    def decode(kernel):
        calls.clear()
        for a in attn:
            a.decode_kernel = kernels._decode_attention if kernel else None
        cache = KVCache.for_model(m.config, 1, 16, dtype=torch.bfloat16)
        with torch.no_grad():
            m(ids[:, :5], pos=torch.arange(5)[None], cache=cache, kv_len=5)
            assert not calls  # prefill: SDPA
            return m(ids[:, 5:], pos=torch.tensor([[5]]), cache=cache, kv_len=6).float()

    fast = decode(True)
    assert len(calls) == 2
    slow = decode(False)
    assert not calls and (fast - slow).abs().max() <= 0.02 * slow.abs().max()
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 6, 16)
    assert kernels._decode_attention(q, k, k, None) is None  # float32 cache
    qb, kb = q.bfloat16().requires_grad_(), k.bfloat16()
    assert kernels._decode_attention(qb, kb, kb, None) is None  # training


# ---------------------------------------------------------------- fused RMSNorm and rotary embedding (bf16)

@needs_native
@pytest.mark.parametrize("shape", [(1, 1, 3072), (2, 3, 100), (5, 7), (64, 13)])
def test_fused_rms_norm_is_the_modules_bf16_result(shape):
    """Bit for bit the module's PyTorch steps on these inputs (the float32 mean's order could differ by one bf16
    step elsewhere: at most one step is allowed), C a multiple of 8 and not, several leading dims, big values."""
    from phi3v.models.layers import RMSNorm

    g = torch.Generator().manual_seed(len(shape) + shape[-1])
    norm = RMSNorm(shape[-1], 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = (torch.randn(*shape, generator=g) * 40).to(torch.bfloat16)
    with torch.no_grad():
        ref = norm(x)
        got = native.ops().rms_norm_bf16(x, norm.weight, 1e-5)
    assert got.shape == ref.shape and got.dtype == torch.bfloat16
    step = ref.float().abs() * 2**-7 + 1e-30
    assert ((got.float() - ref.float()).abs() <= step).all()
    assert (got == ref).float().mean() >= 0.999
    with pytest.raises(RuntimeError, match="bf16"):
        native.ops().rms_norm_bf16(x.float(), norm.weight, 1e-5)


@needs_native
@pytest.mark.parametrize("B,nh,T,hd", [(1, 32, 1, 96), (2, 8, 3, 64), (3, 4, 1, 2)])
def test_fused_rope_is_apply_rotary_bit_for_bit(B, nh, T, hd):
    """The rotary embedding on a transposed (B, T, nh, hd) view as the attention passes it, against
    models.rope.apply_rotary in bf16."""
    from phi3v.models.rope import apply_rotary

    g = torch.Generator().manual_seed(B * nh + T)
    x = torch.randn(B, T, nh, hd, generator=g).to(torch.bfloat16).transpose(1, 2)
    cos, sin = (torch.randn(B, T, hd, generator=g).to(torch.bfloat16) for _ in range(2))
    got = native.ops().rope_bf16(x, cos, sin)
    assert got.is_contiguous() and torch.equal(got, apply_rotary(x, cos, sin))
    with pytest.raises(RuntimeError, match="cos and sin"):
        native.ops().rope_bf16(x, cos[:, :, :-2], sin)


@needs_native
def test_a_bf16_decoder_takes_the_fused_steps_only_where_they_apply(tmp_path, monkeypatch):
    """phi3v.load installs the fused RMSNorm and rotary kernels; a bf16 forward of a few tokens without gradient
    calls them in every layer and gives the same logits as with them off; float32 inputs, more than
    FUSED_MAX_ROWS rows and a gradient to the weight keep PyTorch's steps."""
    import phi3v
    from phi3v.checkpoint.random import create_random
    from phi3v.inference import kernels
    from phi3v.models.layers import Attention, RMSNorm

    ref_dir = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "Phi-3.5-mini-instruct"
    create_random(ref_dir, tmp_path / "m", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, seed=0)
    m = phi3v.load(tmp_path / "m", dtype="bfloat16").model
    norms = [x for x in m.modules() if isinstance(x, RMSNorm)]
    attn = [x for x in m.modules() if isinstance(x, Attention)]
    assert len(norms) == 5 and all(n.fused is kernels._rms_norm for n in norms)
    assert all(a.rotary is kernels._rotary for a in attn)
    calls = []
    lib = native.ops()
    monkeypatch.setattr(native, "ops", lambda: type("Spy", (), {
        "rms_norm_bf16": staticmethod(lambda *a: calls.append("norm") or lib.rms_norm_bf16(*a)),
        "rope_bf16": staticmethod(lambda *a: calls.append("rope") or lib.rope_bf16(*a)),
        "__getattr__": lambda self, n: getattr(lib, n)})())
    ids = torch.tensor([[5, 17, 300, 9, 41, 2]])
    with torch.no_grad():
        fused = m(ids)
    assert calls.count("norm") == 5 and calls.count("rope") == 4  # q and k in each of the 2 layers
    for x in norms:
        x.fused = None
    for a in attn:
        a.rotary = None
    calls.clear()
    with torch.no_grad():
        plain = m(ids)
    assert not calls and torch.equal(fused, plain)
    one = torch.ones(8, dtype=torch.bfloat16)
    assert kernels._rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-5) is None  # float32
    assert kernels._rms_norm(torch.zeros(kernels.FUSED_MAX_ROWS + 1, 8, dtype=torch.bfloat16), one, 1e-5) is None
    assert kernels._rms_norm(torch.zeros(1, 8, dtype=torch.bfloat16), one.clone().requires_grad_(), 1e-5) is None
    x = torch.zeros(1, 2, 1, 4, dtype=torch.bfloat16)
    assert kernels._rotary(x, torch.ones(1, 1, 4), torch.ones(1, 1, 4)) is None  # float32 cos, sin


@needs_native
@pytest.mark.slow
def test_torch_compile_traces_the_kernels_and_gives_their_exact_values():
    """`phi3v bench --compile` / Engine(compile=True) trace a bf16 forward through every kernel a model calls: each
    needs a CPU kernel with a fake (shapes only) beside it; compiled, they return eager's values bit for bit."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    x, w = rnd(3, 64), rnd(48, 64)
    q, k, v = rnd(2, 4, 1, 16), rnd(2, 2, 7, 16), rnd(2, 2, 7, 16)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., :2] = False
    xr, cos, sin = rnd(2, 4, 3, 16), rnd(2, 3, 16), rnd(2, 3, 16)
    w8 = native.int8_pack(torch.randint(-128, 128, (48, 64), dtype=torch.int8, generator=g))
    s8 = torch.rand(48, generator=g)
    w4 = native.int4_pack(torch.randint(0, 256, (48, 32), dtype=torch.uint8, generator=g))
    sz = native.int4_scales(torch.rand(2, 48, 2, generator=g).to(torch.bfloat16))
    lib = native.ops()

    def forward(x, w, q, k, v, mask, xr, cos, sin):
        return (lib.bf16_gemv(x, w), lib.bf16_gemm(x, w), lib.decode_attention(q, k, v, mask, 0.25),
                lib.rms_norm_bf16(x, w[0], 1e-5), lib.rope_bf16(xr, cos, sin), lib.int8_matmul(x, w8, s8),
                lib.int4_matmul(x, w4, sz, 32))

    args = (x, w, q, k, v, mask, xr, cos, sin)
    eager = forward(*args)
    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True, dynamic=True)(*args)
    for a, b in zip(eager, compiled, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert not torch.equal(eager[0], torch.zeros_like(eager[0]))


# ---------------------------------------------------------------- weights on transparent huge pages

def _mapping_field(ptr: int, field: str) -> int:
    """kB of `field` in /proc/self/smaps for the mapping that holds address ptr."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {ptr:#x}")


needs_thp = pytest.mark.skipif(not hugepages_on_request(), reason="no transparent huge pages on request here")


@needs_thp
def test_hugepage_copies_equal_their_sources_on_huge_pages_and_give_the_file_pages_back(tmp_path):
    from safetensors.torch import save_file

    from phi3v.checkpoint.safetensors import SafetensorsFile
    from phi3v.hardware import HUGE_PAGE, hugepage_copies

    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 3072, generator=g).to(torch.bfloat16)  # 12 MiB
    b = torch.randn(7, 5, generator=g)  # an odd size: the next copy still starts on a page
    save_file({"w": w, "b": b}, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    mapped_w, mapped_b = f.get("w"), f.get("b")
    assert torch.equal(mapped_w, w)  # every page of the file's w resident now
    resident_before = _mapping_field(mapped_w.data_ptr(), "Rss")
    cw, cb, cw2 = hugepage_copies([mapped_w, mapped_b, mapped_w])
    assert torch.equal(cw, w) and torch.equal(cb, b) and torch.equal(cw2, w)
    assert cw.dtype == torch.bfloat16 and cw.shape == w.shape and cw.is_contiguous()
    assert cw.data_ptr() % HUGE_PAGE == 0 and cb.data_ptr() % 4096 == 0 and cw2.data_ptr() % 4096 == 0
    assert _mapping_field(cw.data_ptr(), "AnonHugePages") >= 4096  # at least two 2 MiB pages of the 12 MiB
    assert resident_before >= 12 << 10 and _mapping_field(mapped_w.data_ptr(), "Rss") < 4 << 10  # file pages back
    assert torch.equal(mapped_w, w)  # the source stays valid (read again from the file)


def test_hugepage_copies_do_nothing_where_switched_off(monkeypatch):
    from phi3v import hardware

    monkeypatch.setenv("PHI3V_HUGEPAGES", "0")
    hardware.hugepages_on_request.cache_clear()
    try:
        assert hardware.hugepage_copies([torch.ones(4)]) is None
    finally:
        monkeypatch.delenv("PHI3V_HUGEPAGES")
        hardware.hugepages_on_request.cache_clear()
    assert hardware.hugepage_copies([]) is None


@needs_thp
def test_hugepage_weights_keep_a_models_values_and_its_tied_weights():
    from phi3v.inference.kernels import use_fast_bf16_linears, use_hugepage_weights

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(96, 64)
            self.mid = nn.Linear(64, 64, bias=True)
            self.head = nn.Linear(64, 96, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.mid(self.emb(ids)))

    torch.manual_seed(0)
    model = Tied().to(torch.bfloat16)
    assert use_fast_bf16_linears(model, kind="emulated") == 2
    ids = torch.tensor([[3, 50, 95, 0]])
    with torch.no_grad():
        before = model(ids)
    old_head = model.head.weight
    assert use_hugepage_weights(model) == 2
    assert model.head.weight is model.emb.weight and model.head.weight is not old_head  # still one tied weight
    assert torch.equal(model.head.weight, old_head) and model.head.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(model(ids), before)


@needs_thp
@needs_native
def test_a_loaded_int4_model_runs_its_kernel_copies_from_huge_pages_with_the_same_logits(tmp_path, monkeypatch):
    import phi3v
    from phi3v import hardware
    from phi3v.checkpoint.random import create_random
    from phi3v.quant.layers import WeightOnlyInt4Linear

    ref_dir = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "Phi-3.5-mini-instruct"
    create_random(ref_dir, tmp_path / "m", layers=2, hidden=256, heads=4, kv_heads=2, intermediate=512, seed=0)
    ids = torch.tensor([[5, 17, 300, 9, 41, 2]])

    def run(huge: str):
        monkeypatch.setenv("PHI3V_HUGEPAGES", huge)
        hardware.hugepages_on_request.cache_clear()
        m = phi3v.load(tmp_path / "m", dtype="bfloat16", quantize="int4").model
        layers = [x for x in m.modules() if isinstance(x, WeightOnlyInt4Linear) and x.packed_for == "native"]
        with torch.no_grad():
            return m(ids), [x.packed.data_ptr() for x in layers], m

    try:
        plain, _, _ = run("0")
        huge, ptrs, model = run("1")  # (the model holds the mapping)
    finally:
        monkeypatch.delenv("PHI3V_HUGEPAGES")
        hardware.hugepages_on_request.cache_clear()
    assert len(ptrs) == 2 * 4 + 1 and torch.equal(plain, huge)  # 4 linears per layer and the lm_head
    assert all(p % 4096 == 0 for p in ptrs) and _mapping_field(ptrs[0], "AnonHugePages") > 0
    del model

"""The bf16 linear swap (same values as F.linear up to bf16 rounding, same parameter names) and `phi3v bench`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phi3v.cli import main
from phi3v.inference.kernels import PLANS, BF16Linear, use_fast_bf16_linears


@pytest.mark.parametrize("kind,rows", [(k, r) for k, (_, up) in PLANS.items()
                                       for r in ((1, 3, up - 1, up, up + 66) if up else (1, 3, 16, 17, 322))])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_linear_matches_f_linear(kind, rows, bias):
    g = torch.Generator().manual_seed(rows)
    lin = nn.Linear(96, 200, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(200, 96, generator=g))
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    exact = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    got = BF16Linear.from_linear(lin, kind)(x).double()
    # both round a float32-accurate result to bf16: at most 1 ulp of bf16 (2^-8 relative) apart from exact
    assert ((got - exact).abs() <= exact.abs() * 2**-7 + 1e-2).all()
    assert got.shape == (rows, 200)


def test_swap_keeps_names_and_shares_weights():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4, bias=False))).to(torch.bfloat16)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    n = use_fast_bf16_linears(model)
    from phi3v.hardware import cpu_bf16_matmul

    assert n == (2 if cpu_bf16_matmul() in PLANS else 0)
    assert use_fast_bf16_linears(nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16), kind="amx") == 0
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before


def test_bench_json_with_transformers_baseline(tiny_phi3, capsys):
    assert main(["bench", "--model", str(tiny_phi3), "--dtype", "float32", "--prompt-tokens", "16",
                 "--new-tokens", "8", "--batch", "2", "--baseline", "transformers", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours, base = out["phi3v"], out["transformers"]
    assert (ours["batch"], ours["prompt_tokens"], ours["new_tokens"]) == (2, 16, 8)
    assert (base["batch"], base["prompt_tokens"], base["new_tokens"]) == (2, 16, 8)
    for key in ("prefill_tok_s", "decode_tok_s"):
        assert ours[key] > 0 and base[key] > 0
        assert out["ratio"][key] == pytest.approx(ours[key] / base[key])
    assert ours["peak_rss_mib"] > 0 and 0 < ours["ttft_s"]


def test_bench_with_image(capsys):
    from conftest import FIXTURES

    d = FIXTURES / "phi35_vision_tiny"
    assert main(["bench", "--model", str(d), "--dtype", "float32", "--image", str(d / "B1_single_800x600" / "image_1.png"),
                 "--new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["phi3v"]["prompt_tokens"] > 757  # the image's 757 tokens are in the prompt


def test_bench_baseline_refuses_vision_models(capsys):
    from conftest import FIXTURES

    assert main(["bench", "--model", str(FIXTURES / "phi35_vision_tiny"), "--dtype", "float32", "--new-tokens", "2",
                 "--prompt-tokens", "4", "--baseline", "transformers"]) == 2
    assert "needs a text model" in capsys.readouterr().err


@pytest.mark.parametrize("flags,kind", [(None, "unknown"), ({"avx2", "fma"}, "emulated"),
                                        ({"avx512f", "avx512bw"}, "emulated"), ({"avx512f", "avx512_bf16"}, "avx512_bf16"),
                                        ({"avx512_bf16", "amx_bf16"}, "amx")])
def test_bf16_matmul_kind_from_cpu_flags(monkeypatch, flags, kind):
    import phi3v.hardware as hw

    monkeypatch.setattr(hw, "cpu_flags", lambda: None if flags is None else frozenset(flags))
    assert hw.cpu_bf16_matmul() == kind
    model = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    assert use_fast_bf16_linears(model, kind) == (1 if kind in PLANS else 0)


@pytest.mark.parametrize("flags,vendor,expect", [({"avx2", "fma"}, "AuthenticAMD", "avx2"),
                                                 ({"avx512f", "avx512bw"}, "GenuineIntel", "emulated"),
                                                 ({"avx512f", "avx512_bf16"}, "GenuineIntel", "avx512_bf16"),
                                                 ({"avx512f", "avx512_bf16"}, None, "avx512_bf16"),
                                                 ({"avx512f", "avx512_bf16"}, "AuthenticAMD", "avx512_bf16_amd")])
def test_the_plan_picked_for_this_cpu(monkeypatch, flags, vendor, expect):
    """Without AVX-512 the "avx2" plan (many rows through phi3v's bf16 GEMM); AVX512_BF16 on AMD keeps F.linear for
    many rows (oneDNN's bf16 GEMM is the fast one there); the other kinds keep theirs."""
    import phi3v.hardware as hw
    import phi3v.inference.kernels as k

    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(k, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(k, "cpu_vendor", lambda: vendor)
    model = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    assert use_fast_bf16_linears(model) == 1
    layer = model[0]
    assert (layer.mv_one_row, layer.upcast_min_rows) == PLANS[expect] and layer.native_gemm == (expect == "avx2")


def test_auto_dtype_is_bf16_for_quantized_weights(monkeypatch, tmp_path):
    """int8/int4 layers are fast in half precision only: "auto" gives bf16 for them even where float32 is the
    CPU's default (AVX2-only), for --quantize and for a saved quantized checkpoint."""
    import phi3v.hardware as hw
    from phi3v.api import Phi3Model
    from phi3v.checkpoint.quantized import quantize_checkpoint

    monkeypatch.setattr(hw, "cpu_prefers_bf16", lambda: False)
    assert hw.auto_dtype("cpu") == "float32" and hw.auto_dtype("cpu", quantized=True) == "bfloat16"
    fixtures = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "phi3v"
    quantize_checkpoint(fixtures / "phi35_vision_tiny", tmp_path / "q", "int8")
    for path, quantize in ((fixtures / "phi35_vision_tiny", None), (fixtures / "phi35_vision_tiny", "int8"),
                           (tmp_path / "q", None)):
        m = Phi3Model.load(path, quantize=quantize)
        want = torch.float32 if path.name != "q" and quantize is None else torch.bfloat16
        assert m.model.model.embed_tokens.weight.dtype == want


def test_the_amd_bf16_plan_never_upcasts(monkeypatch):
    """Many rows on AVX512_BF16 AMD CPUs go to F.linear (bit for bit), never to the float32 upcast."""
    import phi3v.inference.kernels as k

    monkeypatch.setattr(k, "upcast_linear", lambda *a: pytest.fail("upcast taken"))
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(2, 400, 64, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(BF16Linear.from_linear(lin, "avx512_bf16_amd")(x), F.linear(x, lin.weight, lin.bias))

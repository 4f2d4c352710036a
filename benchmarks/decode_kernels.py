"""Streaming speed of phi3v's decode kernels (bf16 GEMV, int8 and int4 GEMMs at a few rows) over weights much
larger than the caches, for this CPU's build and for other compiler targets, beside the plain read bandwidth and
fbgemm's int8 GEMM, in one process with interleaved rounds. An AVX-512 machine can run the AVX2 builds (the
vpmaddubsw paths a Zen 3 or a laptop without VNNI takes), so their speed can be compared there.

    python benchmarks/decode_kernels.py [--targets native,znver3] [--rows 1] [--rounds 8] [--threads 2]

Each target is compiled once (about 40 s) into ~/.cache/phi3v/decode_kernels/TARGET with the same sources as the
package (`src/phi3v/quant/csrc`), under another library name. Shapes: the linears of 8 layers of Phi-3.5-mini
(qkv 3072 -> 9216, o 3072 -> 3072, gate_up 3072 -> 16384, down 8192 -> 3072) and its lm_head, 1.0 G weights.
Printed: GB/s of weight bytes per kernel and target (medians over rounds) and each one's median per-round ratio to
the read bandwidth of the same round (a sum over every int4 buffer, the reads alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHAPES = [(9216, 3072), (3072, 3072), (16384, 3072), (3072, 8192)] * 8 + [(32064, 3072)]


def build(target: str):
    from torch.utils import cpp_extension

    where = Path.home() / ".cache" / "phi3v" / "decode_kernels" / target
    where.mkdir(parents=True, exist_ok=True)
    lib = f"phi3v_dk_{target.replace('-', '_')}"
    sources = []
    for name in ("int_rows.h", "gemv.cpp", "int4.cpp", "int8.cpp"):
        text = (ROOT / "src/phi3v/quant/csrc" / name).read_text()
        for macro in ("TORCH_LIBRARY", "TORCH_LIBRARY_FRAGMENT", "TORCH_LIBRARY_IMPL"):
            text = text.replace(f"{macro}(phi3v_native", f"{macro}({lib}")
        path = where / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        if name.endswith(".cpp"):
            sources.append(str(path))
    cpp_extension.load(name=lib, sources=sources, build_directory=str(where), is_python_module=False,
                       extra_cflags=["-O3", f"-march={target}", "-fopenmp"], extra_ldflags=["-fopenmp"])
    return getattr(torch.ops, lib)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="native,znver3", help="-march values, comma-separated")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from phi3v.hardware import cpu_flags
    from phi3v.quant import cpu_int8
    from phi3v.quant.layers import quantize_int4, quantize_int8

    targets = [t for t in args.targets.split(",") if t]
    ops = {t: build(t) for t in targets}
    first = ops[targets[0]]
    g = torch.Generator().manual_seed(0)
    layers = []
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g) * 0.02
        q8, s8 = quantize_int8(w, torch.bfloat16)
        q4, sz = quantize_int4(w, 128, torch.bfloat16)
        terms = sz.permute(0, 2, 1).reshape(k // 128, 2, n // 16, 16).permute(2, 0, 1, 3).contiguous()  # int4_scales
        layers.append({"k": k, "bf16": w.to(torch.bfloat16), "int8": first.int8_pack(q8), "scale": s8.float(),
                       "fbgemm": cpu_int8.prepack(q8, s8) if cpu_int8.available() else None,
                       "int4": first.int4_pack(q4), "terms": terms})
        del w
    x = {k: torch.randn(args.rows, k, generator=g).to(torch.bfloat16) for k in (3072, 8192)}
    nbytes = {"bf16": sum(n * k * 2 for n, k in SHAPES), "int8": sum(n * k for n, k in SHAPES),
              "int4": sum(L["int4"].numel() + L["terms"].numel() * 2 for L in layers)}

    def timed(nb, fn):
        t0 = time.perf_counter()
        for L in layers:
            fn(L)
        return nb / (time.perf_counter() - t0) / 1e9

    runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        runs.setdefault("read (sum)", []).append(timed(nbytes["int4"], lambda L: L["int4"].view(torch.float32).sum()))
        for t, lib in ops.items():
            runs.setdefault(f"bf16 gemv [{t}]", []).append(
                timed(nbytes["bf16"], lambda L: lib.bf16_gemv(x[L["k"]], L["bf16"])))
            runs.setdefault(f"int8 [{t}]", []).append(
                timed(nbytes["int8"], lambda L: lib.int8_matmul(x[L["k"]], L["int8"], L["scale"])))
            runs.setdefault(f"int4 g128 [{t}]", []).append(
                timed(nbytes["int4"], lambda L: lib.int4_matmul(x[L["k"]], L["int4"], L["terms"], 128)))
        if layers[0]["fbgemm"] is not None:
            runs.setdefault("int8 fbgemm (PyTorch)", []).append(
                timed(nbytes["int8"], lambda L: cpu_int8.matmul(x[L["k"]], L["fbgemm"], 8, torch.bfloat16)))
    flags = sorted(f for f in (cpu_flags() or ()) if f.startswith(("avx", "amx", "fma")))
    print(f"CPU flags: {' '.join(flags)}; {args.threads} threads, {args.rows} row(s), {args.rounds} rounds")
    base = runs["read (sum)"]
    for name, v in runs.items():
        ratio = statistics.median(a / b for a, b in zip(v, base))
        print(f"  {name:28} {statistics.median(v):6.1f} GB/s   {ratio:5.2f}x the read bandwidth")


if __name__ == "__main__":
    main()

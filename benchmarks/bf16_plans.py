"""Which kernel a bf16 linear of many rows should take on this CPU: PyTorch's `F.linear` (oneDNN where the CPU has
AVX512_BF16), float32 GEMM on weights upcast on the fly (`quant.layers.upcast_linear`) and phi3v's own bf16 GEMM
(`native.bf16_gemm`), at the decoder's and the CLIP tower's shapes, in one process with interleaved rounds; and
which one the plan `inference.kernels.use_fast_bf16_linears` picks here. The plans (`kernels.PLANS`) were
chosen from this script's kind of figures; run it on a new CPU kind before trusting them there.

    python benchmarks/bf16_plans.py [--rows 64,256,577,773] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv 3072->9216": (3072, 9216), "gate_up 3072->16384": (3072, 16384), "down 8192->3072": (8192, 3072),
          "clip fc1 1024->4096": (1024, 4096), "clip fc2 4096->1024": (4096, 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="64,256,577,773")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from phi3v.hardware import cpu_bf16_matmul, cpu_flags, cpu_vendor
    from phi3v.inference.kernels import BF16Linear, use_fast_bf16_linears
    from phi3v.quant import native
    from phi3v.quant.layers import upcast_linear

    flags = sorted(f for f in (cpu_flags() or ()) if f.startswith(("avx", "amx", "fma")))
    probe = torch.nn.Sequential(torch.nn.Linear(16, 16)).to(torch.bfloat16)
    use_fast_bf16_linears(probe)
    plan = ((probe[0].mv_one_row, probe[0].upcast_min_rows, probe[0].native_gemm)
            if isinstance(probe[0], BF16Linear) else "F.linear (not swapped)")
    print(f"CPU {cpu_vendor()}, kind {cpu_bf16_matmul()}, flags {' '.join(flags)}; {args.threads} threads")
    print(f"plan here (torch.mv at one row, upcast from rows, native GEMM): {plan}")
    kernels = {"F.linear": lambda x, w: F.linear(x, w), "upcast": upcast_linear}
    if native.ops() is not None:
        kernels["native gemm"] = native.bf16_gemm
    g = torch.Generator().manual_seed(0)
    print(f"{'shape':22s} {'rows':>5s} " + " ".join(f"{k + ' GFLOP/s':>19s}" for k in kernels))
    for name, (K, N) in SHAPES.items():
        w = (torch.randn(N, K, generator=g) * 0.02).to(torch.bfloat16)
        for M in (int(r) for r in args.rows.split(",")):
            x = torch.randn(M, K, generator=g).to(torch.bfloat16)
            times = {k: [] for k in kernels}
            for k, f in kernels.items():  # first call of a shape: oneDNN's kernel generation, not timed
                f(x, w)
            for _ in range(args.rounds):
                for k, f in kernels.items():
                    t = time.perf_counter()
                    f(x, w)
                    times[k].append(time.perf_counter() - t)
            print(f"{name:22s} {M:5d} " + " ".join(f"{2 * M * K * N / statistics.median(times[k]) / 1e9:19.0f}"
                                                    for k in kernels))


if __name__ == "__main__":
    main()

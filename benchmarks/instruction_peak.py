"""This CPU core's peak rates of the three dot-product instructions phi3v's CPU paths can use: float32 FMA
(vfmadd, the float32 GEMM's), bf16 pairs (vdpbf16ps, AVX512_BF16) and u8 x s8 quads (vpdpbusd, AVX512_VNNI), each
on 12 independent accumulators, compiled here with g++ -O2 -march=native. It says what a GEMM could at best gain
from each: a bfloat16 GEMM can only beat float32 by the vdpbf16ps / vfmadd ratio of multiply-adds per second.

    python benchmarks/instruction_peak.py [--iters 200000000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
// 12 independent accumulators in named registers (an array may be kept in memory), 4 steps per loop trip
#define STEP(OP, A) A = OP;
#define TWELVE(M) M(a0) M(a1) M(a2) M(a3) M(a4) M(a5) M(a6) M(a7) M(a8) M(a9) M(a10) M(a11)
template <class F> double seconds(F f) {
  auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
int main(int argc, char** argv) {
  const long n = std::atol(argv[1]);
  const __m512 x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(0.9999f);
  const __m512bh bx = (__m512bh)_mm512_set1_epi16(0x3f80);
  const __m512i u = _mm512_set1_epi8(1);
  float s = 0;
  double f, g, h;
  {
    __m512 a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;
#define Z(A) A = _mm512_setzero_ps();
    TWELVE(Z)
#define FMA(A) A = _mm512_fmadd_ps(x, y, A);
    f = seconds([&] { for (long i = 0; i < n; ++i) { TWELVE(FMA) TWELVE(FMA) TWELVE(FMA) TWELVE(FMA) } });
#define SUMPS(A) s += _mm512_reduce_add_ps(A);
    TWELVE(SUMPS)
    TWELVE(Z)
#define BF(A) A = _mm512_dpbf16_ps(A, bx, bx);
    g = seconds([&] { for (long i = 0; i < n; ++i) { TWELVE(BF) TWELVE(BF) TWELVE(BF) TWELVE(BF) } });
    TWELVE(SUMPS)
  }
  {
    __m512i a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;
#define ZI(A) A = _mm512_setzero_si512();
    TWELVE(ZI)
#define DP(A) A = _mm512_dpbusd_epi32(A, u, u);
    h = seconds([&] { for (long i = 0; i < n; ++i) { TWELVE(DP) TWELVE(DP) TWELVE(DP) TWELVE(DP) } });
#define SUMI(A) s += _mm512_reduce_add_epi32(A);
    TWELVE(SUMI)
  }
  const double k = n * 48.0 / 1e9;  // G instructions
  std::printf("%.4f %.4f %.4f %g\n", k / f * 16, k / g * 32, k / h * 64, s);  // G multiply-adds per second
}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20_000_000)
    args = ap.parse_args()
    flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()) \
        if Path("/proc/cpuinfo").is_file() else set()
    missing = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni") if f not in flags]
    if missing or not shutil.which("g++"):
        print(f"needs g++ and a CPU with avx512f, avx512_bf16, avx512_vnni (missing: {missing or 'g++'})")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.cpp", Path(tmp) / "peak"
        src.write_text(SOURCE)
        subprocess.run(["g++", "-O2", "-march=native", str(src), "-o", str(exe)], check=True)
        fma, bf16, vnni = map(float, subprocess.run([str(exe), str(args.iters)], capture_output=True, text=True,
                                                    check=True).stdout.split()[:3])
    print(f"one core, G multiply-adds/s: float32 FMA {fma:.1f}, bf16 vdpbf16ps {bf16:.1f} ({bf16 / fma:.2f}x), "
          f"u8 x s8 vpdpbusd {vnni:.1f} ({vnni / fma:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

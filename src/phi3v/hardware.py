"""What this machine's CPU can do, read once from /proc/cpuinfo: the one place phi3v asks about CPU features; and
the C heap's trim, for long-running processes."""

from __future__ import annotations

import ctypes
import functools

NATIVE_BF16 = ("avx512_bf16", "amx_bf16")  # bfloat16 dot products in hardware
AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")  # what PyTorch's AVX512 kernels need


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags, or None where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86 / ARM
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_bf16_matmul() -> str:
    """How PyTorch's bfloat16 matmuls run here: "amx" (tiles: faster than float32), "avx512_bf16" (dot-product
    instructions, yet measured 0.44-0.63x of float32 GEMM with torch 2.13 on such a Xeon), "emulated", or
    "unknown" (no /proc/cpuinfo)."""
    flags = cpu_flags()
    if flags is None:
        return "unknown"
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "emulated"


def cpu_prefers_bf16() -> bool:
    """Whether dtype "auto" picks bfloat16 on this CPU: with AVX-512 (its bf16 is fast enough even when emulated,
    with inference.kernels' linears) or native bf16; AVX2-only CPUs run float32."""
    flags = cpu_flags() or frozenset()
    return all(f in flags for f in AVX512) or any(f in flags for f in NATIVE_BF16)


def auto_dtype(device: str) -> str:
    """The dtype "auto" stands for on a device: bfloat16 on accelerators and on CPUs that prefer it, else float32."""
    return "bfloat16" if device != "cpu" or cpu_prefers_bf16() else "float32"


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim): freed tensors and buffers otherwise stay in
    the process's RSS. False where the C library has no such call (nothing is done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

"""phi3v's own C++ CPU kernels (`csrc/*.cpp`: the bf16 GEMV, the int4 x int8 and int8 x int8 GEMMs, the row scaling
around fbgemm's int8 GEMM, fused bf16 RMSNorm and rotary embedding), compiled on first use for this CPU (-march=native) with
PyTorch's extension builder and cached under ~/.cache/phi3v/kernels (one build per source, torch version and CPU
kind); later processes load the cached library in milliseconds. Where no compiler or ninja is found, or the build
fails, `ops()` is None, PyTorch's own kernels run instead and a warning says so once. PHI3V_NATIVE=0 turns the
kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

from ..hardware import cpu_flags

SOURCES = tuple(Path(__file__).with_name("csrc") / f for f in ("gemv.cpp", "int4.cpp", "int8.cpp", "rows.cpp", "fused.cpp"))
HEADERS = (Path(__file__).with_name("csrc") / "int_rows.h",)  # included by the sources: part of the build key
LIBRARY = "phi3v_native"
# -fopenmp: at::parallel_for is inlined into the library and runs on OpenMP (PyTorch's own libgomp.so.1, already
# loaded by the process, serves it); without it every kernel would run on one thread. PHI3V_NATIVE_MARCH (default
# native; words after the first are more compiler flags) builds for another target: the tests build haswell (AVX2),
# haswell -mavxvnni (AVX-VNNI) and x86-64 (scalar) to check those variants.
MARCH, *EXTRA = os.environ.get("PHI3V_NATIVE_MARCH", "native").split() or ["native"]
CFLAGS = ["-O3", f"-march={MARCH}", *EXTRA, "-fopenmp"]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "phi3v" / "kernels"


def build_key() -> str:
    """What the compiled library depends on: the source, torch, the compiler target (this CPU's flags)."""
    h = hashlib.sha256()
    for source in SOURCES + HEADERS:
        h.update(source.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(CFLAGS).encode())
    h.update(platform.machine().encode())
    h.update(" ".join(sorted(cpu_flags() or ())).encode())
    return h.hexdigest()[:16]


def _ninja_on_path() -> None:
    """The `ninja` wheel's binary, for a process started without its venv's bin on PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


@functools.cache
def ops():
    """torch.ops.phi3v_native with the compiled kernels, or None (then said once, as a RuntimeWarning)."""
    if os.environ.get("PHI3V_NATIVE", "1") == "0":
        return None
    if platform.machine() not in ("x86_64", "AMD64"):
        return _unavailable(f"the kernels are written for x86-64, this is {platform.machine()}")
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()
        where = cache_root() / build_key()
        where.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpp_extension.load(name=f"{LIBRARY}_{build_key()}", sources=[str(s) for s in SOURCES],
                               build_directory=str(where), extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                               is_python_module=False, verbose=False)
        _register_fakes()
        return getattr(torch.ops, LIBRARY)
    except Exception as e:  # no compiler, no ninja, a failed build: PyTorch's kernels run instead
        return _unavailable(f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}")


def _register_fakes() -> None:
    """The output of each kernel that a model's forward calls, from its inputs' shapes alone, so that torch.compile
    (`phi3v bench --compile`, `Engine(compile=True)`) traces them as opaque calls instead of failing on them."""
    def rows_by(n):  # (M, K) x -> (M, n) float32
        return lambda x, *rest: x.new_empty((x.shape[0], n(*rest)), dtype=torch.float32)

    fakes = {
        "bf16_gemv": rows_by(lambda w: w.shape[0]),
        "bf16_gemm": rows_by(lambda w: w.shape[0]),
        "int8_matmul": rows_by(lambda packed, scale: packed.shape[0] * 16),
        "int4_matmul": rows_by(lambda packed, sz, group: packed.shape[0] * 16),
        "decode_attention": lambda q, k, v, mask, scale: q.new_empty(q.shape, dtype=torch.float32),
        "rms_norm_bf16": lambda x, w, eps: torch.empty_like(x),
        "rope_bf16": lambda x, cos, sin: x.new_empty(x.shape),
    }
    for name, fake in fakes.items():
        try:
            torch.library.register_fake(f"{LIBRARY}::{name}")(fake)
        except RuntimeError:  # already registered: ops() ran again after its cache was cleared (the tests do)
            pass


def _unavailable(why: str) -> None:
    warnings.warn(f"phi3v: its C++ CPU kernels are unavailable ({why}); PyTorch's kernels run instead (slower "
                  "bfloat16 decode)", RuntimeWarning, stacklevel=3)
    return None


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x (M, K) @ weight (N, K).T in float32 for a bfloat16 weight, or None without the kernels."""
    lib = ops()
    return None if lib is None else lib.bf16_gemv(x, weight)


def bf16_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T in float32 for a bfloat16 weight and many rows (needs `ops()`)."""
    return ops().bf16_gemm(x, weight)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per row, q (B, nh, 1, hd), against bf16 k, v (B, nkv, S, hd) (nh a multiple of
    nkv), mask None or bool (B, 1, 1, S); float32 arithmetic, the result in q's dtype (needs `ops()`)."""
    return ops().decode_attention(q, k, v, mask, q.shape[-1] ** -0.5).to(q.dtype)


def int4_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The checkpoint's int4 weight, uint8 (N, K/2), in the int4 GEMM's layout (N/16, K/8, 64), or None."""
    lib = ops()
    return None if lib is None else lib.int4_pack(weight)


def int4_scales(scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """(K/G, N, 2) scale, zero -> (N/16, K/G, 2, 16) scale, zero: the int4 GEMM's per-group terms, each block of 16
    output columns' terms contiguous, group after group (one sequential stream beside the block's weights: a
    (K/G, 2, N) layout made every group a page of its own, 1.2x slower decode on Zen 3). bf16 for a bf16
    checkpoint (its own values, half the bytes), else float32 (float16 scales would lose bits in bf16)."""
    dtype = torch.bfloat16 if scales_and_zeros.dtype == torch.bfloat16 else torch.float32
    terms = scales_and_zeros.to(dtype).permute(0, 2, 1)  # (K/G, 2, N)
    G_, _, N = terms.shape
    return terms.reshape(G_, 2, N // 16, 16).permute(2, 0, 1, 3).contiguous()


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (M, K) @ the int4 weight's dequantized (N, K).T -> float32 (M, N), activations quantized to int8 per row."""
    return ops().int4_matmul(x, packed, sz, group_size)


def int8_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The checkpoint's int8 weight (N, K) in the int8 GEMM's layout (N/16, K/4, 64), or None without the kernels."""
    lib = ops()
    return None if lib is None else lib.int8_pack(weight)


def int8_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (weight * scale[:, None]).T -> float32 (M, N), activations quantized to int8 per row; scale
    float32 (N,) (needs `ops()`)."""
    return ops().int8_matmul(x, packed, scale)

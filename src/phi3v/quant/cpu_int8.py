"""PyTorch's fbgemm int8 GEMM (`quantized::linear_dynamic`, in torch core) for the int8 layers' half-precision CPU
forward at every row count (decode, prefill, the CLIP tower).

fbgemm quantizes its input per tensor to 8 bits. Here each row is first divided by its own largest magnitude (per-row
scales: an outlier row costs the others nothing), and one more row, [-1, 1, 0, ...], pins fbgemm's range to [-1, 1]
so that its grid is one chosen here: fbgemm's per-tensor rounding is then each row's own 8-bit rounding, and a row's
result never depends on the other rows (bits=8, what the layers use: llama.cpp's Q8_0 rounds its activations to 8
bits too, per block of 32). bits=16 also feeds each row's rounding remainder scaled up by QMAX - 1, together about
16-bit activations, within ~1e-4 of the weight-only matmul for twice the rows.

Notation: M rows, K in features, N out features.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..hardware import cpu_flags
from . import native

ENGINE = "fbgemm"
VNNI = ("avx512_vnni", "avx_vnni")  # dot products of u8 x s8 without the int16 saturation of vpmaddubsw


@functools.cache
def available() -> bool:
    """Whether this PyTorch build has fbgemm (x86 builds do; ARM and some others do not)."""
    return ENGINE in torch.backends.quantized.supported_engines


@functools.cache
def reduce_range() -> bool:
    """7-bit activations where the CPU lacks VNNI (fbgemm's u8 x s8 pairs could saturate int16 otherwise)."""
    flags = cpu_flags() or frozenset()
    return not any(f in flags for f in VNNI)


def prepack(weight: torch.Tensor, scales: torch.Tensor, release=None):
    """int8 (N, K) and per-output-channel scales (N,) -> fbgemm's packed weight (a copy), or None where this PyTorch
    cannot (said once, as a warning: the layer then runs PyTorch's int8 x bf16 kernel at every size). `release(weight)`
    is called once the weight's bytes are copied, before the packed copy is made (a memory-mapped weight gives its
    pages back there, so a layer never holds three copies at once)."""
    if not available():
        _fallback(f"this PyTorch has no {ENGINE} engine")
        return None
    previous = torch.backends.quantized.engine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated: the packed weight is what is used
            q = torch._make_per_channel_quantized_tensor(weight.contiguous(), scales.double(),
                                                         torch.zeros(weight.shape[0], dtype=torch.long), 0)
            if release is not None:
                release(weight)
            torch.backends.quantized.engine = ENGINE  # prepack packs for the engine current at the call
            return torch.ops.quantized.linear_prepack(q, None)
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        _fallback(f"{type(e).__name__}: {e}")
        return None
    finally:
        torch.backends.quantized.engine = previous


@functools.cache
def _fallback(why: str) -> None:
    warnings.warn(f"phi3v: fbgemm's int8 GEMM is unavailable ({why}); many-row int8 layers use PyTorch's int8 x "
                  "bf16 kernel instead (slower prefill)", RuntimeWarning, stacklevel=3)


def unpack(packed) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed weight back as int8 (N, K) and float32 scales (N,) (fresh copies)."""
    q, _ = torch.ops.quantized.linear_unpack(packed)
    return q.int_repr(), q.q_per_channel_scales().float()


_PIN = torch.tensor([-1.0, 1.0])


@functools.cache
def _grid() -> tuple[float, int]:
    """fbgemm's quantization parameters (scale, zero point) for the range [-1, 1]: the ones linear_dynamic derives
    from a tensor whose pin row makes its range exactly that."""
    return torch._choose_qparams_per_tensor(_PIN, reduce_range())


def _gemm(z: torch.Tensor, rows: int, packed) -> torch.Tensor:
    """fbgemm's int8 GEMM of z's first `rows` rows, each within [-1, 1], on the grid of [-1, 1]. Where the fused
    entry point exists it is given that grid, so it skips the min/max pass over z that linear_dynamic makes (and the
    pin row at z[rows]); both round z to the same integers, the results are bit-identical. Zen 3, 2 threads, 2885
    rows of CLIP alone: 1.03-1.3x the speed of linear_dynamic; the whole int8 tower of the 773-token image prompt,
    10 interleaved pairs: 0.81-1.16x, median 1.01x (within this VM's noise)."""
    fused = getattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32", None)
    if fused is None:
        return torch.ops.quantized.linear_dynamic(z, packed, reduce_range())[:rows]
    scale, zero_point = _grid()
    return fused(z[:rows], scale, zero_point, packed)


def matmul(x2d: torch.Tensor, packed, bits: int = 16, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, K) float @ the packed int8 weight's dequantized (N, K).T -> (M, N) of out_dtype; K >= 2. `bits` 16: each
    row goes in as its 8-bit rounding plus the remainder (about 16-bit activations, twice the rows); 8: the 8-bit
    rounding alone (per-row scales, as llama.cpp's Q8_0 activations per block of 32: about 0.4% of a row's largest
    value per element; a third of the time at prefill sizes). The 8-bit path scales rows in and out with phi3v's
    C++ kernels where they are built (one pass each way)."""
    M, K = x2d.shape
    qmax = 127 if reduce_range() else 255
    step = 2 / qmax  # fbgemm's grid over [-1, 1]: k * step for integer k
    top = (qmax - 1) // 2 * step  # rows are scaled into [-top, top], whose rounding stays on that grid
    lib = native.ops() if bits == 8 else None
    if lib is not None:
        z, amax = lib.scale_rows_in(x2d, top)
        return lib.scale_rows_out(_gemm(z, M, packed), amax.mul_(1 / top), out_dtype)
    x = x2d.float()
    amax = x.abs().amax(1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
    if bits == 8:
        z = torch.empty(M + 1, K)
        torch.mul(x, top / amax, out=z[:M])  # fbgemm rounds these to its grid: the 8-bit activations
        z[M].zero_()[:2] = _PIN  # pins fbgemm's range, and so its grid
        return _gemm(z, M, packed).mul_(amax / top).to(out_dtype)
    if bits != 16:
        raise ValueError(f"activation bits must be 8 or 16, not {bits!r}")
    z = torch.empty(2 * M + 1, K)
    torch.mul(x, top / amax, out=z[:M])  # rows within [-top, top]
    torch.mul(z[:M], 1 / step, out=z[M:2 * M]).round_().mul_(step)  # their 8-bit rounding, on fbgemm's grid
    z[:M].sub_(z[M:2 * M]).mul_(qmax - 1)  # the remainder (within +-step/2) scaled up to +-top
    z[2 * M].zero_()[:2] = _PIN
    y = _gemm(z, 2 * M, packed)  # (2M, N)
    return y[M:2 * M].add_(y[:M], alpha=1 / (qmax - 1)).mul_(amax / top).to(out_dtype)

"""Faster bfloat16 linear layers for CPUs where PyTorch's bfloat16 GEMM is slow, swapped in from outside the model.

On CPUs without native bfloat16 arithmetic (AVX-512 without AVX512_BF16/AMX) PyTorch's bfloat16 `F.linear` is
emulated: a one-row product streams the weights at about half the speed `torch.mv` reaches, and a long prefill runs
at a quarter of the float32 speed. With AVX512_BF16 but no AMX, one row is fast but many rows still run at
0.44-0.63x of float32 GEMM (torch 2.13, measured on a Xeon with avx512_bf16); on AMD Zen 5 it is the other way round
(2.5-6x the float32 GEMM), so AMD CPUs keep `F.linear` for many rows. `BF16Linear` keeps the same bfloat16 weight
(same parameter names, no extra memory) and picks the faster kernel by the number of rows, with thresholds per CPU
kind (`PLANS`); the results agree with `F.linear` to bfloat16 rounding.

`use_fast_decode_attention` gives the decoders' attention phi3v's C++ kernel for one new token against a bf16 KV
cache (float32 arithmetic): PyTorch's CPU flash attention spends about 0.3-0.4 ms per layer on it at 64 keys
(Zen 3, 32 heads), five times the kernel's time. It also gives RMSNorm and the rotary embedding their fused bf16
kernels for a few tokens (one call each instead of 6-9 ops: 3.3 ms of the 4.5 ms that an 8-layer Phi-3.5-mini
spent per decoded token outside its matmuls on Zen 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..hardware import cpu_bf16_matmul, cpu_flags, cpu_vendor, hugepage_copies
from ..models.layers import Attention, RMSNorm
from ..quant import native
from ..quant.layers import upcast_linear

UPCAST_MIN_ROWS = 64  # from this many rows on, float32 GEMM (weight upcast on the fly) beats emulated bf16
# CPU kind -> (torch.mv for one row, rows from which the float32 GEMM runs). Measured with K 3072 -> N 8192, one
# thread: emulated bf16 needs both; with AVX512_BF16 one row is faster through F.linear (6.8 vs 11.3 ms) and the
# upcast (about 1.2 ns per weight) pays from about 128 rows on (128: 83 vs 86 ms; CLIP's 577 rows: 1.5x).
# "avx2" (emulated bf16 without AVX-512, e.g. AMD Zen 3): PyTorch's float32 GEMM reached only 23-31 G
# multiply-adds/s on 2 threads there, so from 17 rows on phi3v's own bf16 GEMM runs instead (`GEMM_PLANS`; 128 rows,
# K 3072 -> N 9216: 83 vs 85-150 ms upcast; 32 rows 41 vs 92 ms)
# "avx512_bf16_amd" (AMD Zen 4/5: AVX512_BF16 without AMX): PyTorch's bf16 GEMM (oneDNN) ran 2.5-6x the upcast at
# every shape of the decoder and the CLIP tower from 64 to 773 rows (Zen 5, 2 threads: 430-850 against 64-185
# GFLOP/s), so many rows stay with F.linear (None: never upcast); the Xeon's figures above keep "avx512_bf16" for
# other vendors
PLANS = {"emulated": (True, UPCAST_MIN_ROWS), "avx512_bf16": (False, 256), "avx512_bf16_amd": (False, None),
         "avx2": (True, UPCAST_MIN_ROWS)}
GEMM_PLANS = {"avx2"}  # CPU kinds whose many-row bf16 products run native.bf16_gemm
# Rows up to which the C++ kernel beats F.linear (same shape, one thread, avx512_bf16: 1 row 5.3 vs 7.6 ms,
# 8 rows 9.8 vs 11.8, 16 rows 13.6 vs 17.1)
NATIVE_MAX_ROWS = 16


class BF16Linear(nn.Linear):
    """nn.Linear whose bfloat16 CPU forward uses phi3v's C++ kernel for a few rows (else torch.mv for one row, where
    that is faster) and float32 GEMM for many rows."""

    mv_one_row, upcast_min_rows = PLANS["emulated"]
    native_gemm = False

    @classmethod
    def from_linear(cls, lin: nn.Linear, kind: str = "emulated") -> BF16Linear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias
        new.mv_one_row, new.upcast_min_rows = PLANS[kind]
        new.native_gemm = kind in GEMM_PLANS
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if ((0 < rows <= NATIVE_MAX_ROWS or (rows > 0 and self.native_gemm)) and x.device.type == "cpu"
                and self.weight.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and native.ops() is not None):  # (the C++ kernels have no backward)
            kernel = native.bf16_gemv if rows <= NATIVE_MAX_ROWS else native.bf16_gemm
            y = kernel(x.reshape(rows, -1), self.weight)
            y = y if self.bias is None else y + self.bias.float()
            return y.to(x.dtype).view(*x.shape[:-1], -1)
        if rows == 1 and self.mv_one_row:
            y = torch.mv(self.weight, x.reshape(-1))
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], -1)
        if self.upcast_min_rows is not None and rows >= self.upcast_min_rows:
            y = upcast_linear(x, self.weight)
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def use_fast_bf16_linears(model: nn.Module, kind: str | None = None) -> int:
    """Swap every bfloat16 CPU nn.Linear for BF16Linear where PyTorch's bf16 GEMM is slow (`PLANS`: emulated
    bf16, or AVX512_BF16 without AMX); returns how many. `kind` defaults to this CPU's (hardware.cpu_bf16_matmul)."""
    if kind is None:
        kind = cpu_bf16_matmul()
        if kind == "emulated" and "avx512f" not in (cpu_flags() or ()):
            kind = "avx2"
        elif kind == "avx512_bf16" and cpu_vendor() == "AuthenticAMD":
            kind = "avx512_bf16_amd"
    if kind not in PLANS:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and child.weight.dtype == torch.bfloat16
                    and child.weight.device.type == "cpu"):
                setattr(parent, name, BF16Linear.from_linear(child, kind))
                swapped += 1
    return swapped


def use_hugepage_weights(model: nn.Module) -> int:
    """Move the weights of every BF16Linear (bf16 CPU linears that phi3v's own GEMV streams at decode) and the int4
    layers' kernel copies onto transparent huge pages (`hardware.hugepage_copies`), shared weights staying shared;
    returns how many tensors moved (0 where the machine has no huge pages). Zen 4, 2 threads, an 8-layer
    Phi-3.5-mini decode step in one process, steps alternating between the two copies: bf16 1.11x the speed of the
    memory-mapped checkpoint (quartiles 1.03-1.16x), int4 1.03-1.07x (three runs). The int4 copies (heap memory)
    move one at a time (`put`: each heap copy is freed before the next), so peak memory grows by the largest alone
    (20 MiB measured on that model). The int8 ones stay: 0.99-1.04x, for 65 MiB more peak memory (the lm_head's
    copy is 94 MiB), which put a saved int8 checkpoint at 1.20x its weight bytes instead of 1.15x."""
    from ..quant.layers import WeightOnlyInt4Linear

    owners = [m for m in model.modules() if isinstance(m, WeightOnlyInt4Linear) and m.packed_for == "native"
              and m.packed is not None and m.packed.device.type == "cpu"]
    packed = [m.packed for m in owners]
    moved = hugepage_copies(packed, put=lambda i, c: setattr(owners[i], "packed", c)) or []
    del packed
    params = {}
    for m in model.modules():
        if isinstance(m, BF16Linear) and m.weight.device.type == "cpu":
            params[id(m.weight)] = m.weight
    copies = hugepage_copies([p.detach() for p in params.values()])
    if copies is None:
        return len(moved)
    new = {key: nn.Parameter(c, requires_grad=p.requires_grad) for (key, p), c in zip(params.items(), copies)}
    for m in model.modules():  # every holder of a moved weight (tied embeddings included) gets the same new one
        for name, p in list(m._parameters.items()):
            if p is not None and id(p) in new:
                m._parameters[name] = new[id(p)]
    return len(new) + len(moved)


def _decode_attention(q, k, v, mask):
    """native.decode_attention where it applies (CPU, bf16 cache, no gradient, kernels built), else None (SDPA)."""
    if (q.device.type != "cpu" or k.dtype != torch.bfloat16 or v.dtype != torch.bfloat16 or k.stride(-1) != 1
            or v.stride(-1) != 1 or (torch.is_grad_enabled() and q.requires_grad)
            or (mask is not None and (mask.dtype != torch.bool or mask.shape[1:3] != (1, 1)))):
        return None
    if mask is not None and mask.shape[0] != q.shape[0]:
        mask = mask.expand(q.shape[0], -1, -1, -1)
    return native.decode_attention(q, k, v, mask)


FUSED_MAX_ROWS = 64  # rows (tokens) up to which RMSNorm and the rotary embedding take the fused kernels


def _fused_ok(x: torch.Tensor, rows: int) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and rows <= FUSED_MAX_ROWS
            and not (torch.is_grad_enabled() and x.requires_grad))


def _rms_norm(x, weight, eps):
    """native.rms_norm_bf16 for a few bf16 rows without gradient (weight bf16 too), else None."""
    if (not _fused_ok(x, x.numel() // x.shape[-1]) or weight.dtype != torch.bfloat16
            or (torch.is_grad_enabled() and weight.requires_grad)):
        return None
    return native.ops().rms_norm_bf16(x, weight, eps)


def _rotary(x, cos, sin):
    """native.rope_bf16 for bf16 (B, nh, T, hd) with T a few tokens, without gradient, else None."""
    if (not _fused_ok(x, x.shape[2]) or cos.dtype != torch.bfloat16 or sin.dtype != torch.bfloat16
            or x.stride(-1) != 1):
        return None
    return native.ops().rope_bf16(x, cos, sin)


def use_fast_decode_attention(model: nn.Module) -> int:
    """Give every decoder attention (models.layers.Attention) the C++ one-token kernel and the fused rotary
    embedding, and every RMSNorm the fused one, where the kernels are built; returns how many attentions."""
    if native.ops() is None:
        return 0
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for m in layers:
        m.decode_kernel, m.rotary = _decode_attention, _rotary
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.fused = _rms_norm
    return len(layers)

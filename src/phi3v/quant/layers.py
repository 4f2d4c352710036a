"""Weight-only int8 / int4 quantization, swapped in from outside the model (gpt-fast's `WeightOnlyInt8Linear` style).

`quantize_model` replaces linear layers (and PhiMoE's stacked experts) in place and returns the spec that
`checkpoint.quantized.save_quantized` writes to config.json as "quantization"; `checkpoint.load.load_causal_lm` reads
that spec back, builds the same empty modules on the meta device before its strict load and calls `pack_for_kernels`
after it. The weights are what is quantized; on CPU the half-precision layers' fast kernels also round each input
row to 8 bits with its own scale (fbgemm's int8 GEMM, phi3v's int4 x int8 one), as llama.cpp's Q8_0 / Q4_0 do.

Notation: N out features, K in features, G group size, M activation rows, E experts.
Checkpoint layout (device independent; the kernels' own layouts are built after loading, by `pack_for_kernels`):
  int8    `{name}.weight` int8 (N, K), `{name}.scales` (N,)                          w = weight * scales
  int4    `{name}.weight` uint8 (N, K/2): k = 2j in the low nibble of byte j, 2j+1 in the high one,
          `{name}.scales_and_zeros` (K/G, N, 2)                                       w = (q - 8) * scale + zero
  experts `experts.w1` int8 (E, I, C), `experts.w1_scales` (E, I); the same for w2, w3 (int8 under both schemes)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from ..hardware import release_pages, trim_heap
from ..models.phimoe import Experts
from . import cpu_int8, native

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
INT4_N_MULTIPLE = 16  # the CPU int4 kernel packs output channels in blocks of 16 (CUDA's needs 8)
SMALL_M = 4  # CPU kernels other than bf16 are scalar loops (CUDA's int8 one is a thread per output): decode sizes only
# Activation bits of the half-precision CPU int8 layers' fbgemm GEMM (cpu_int8.matmul): 8, each row rounded with its
# own scale (llama.cpp's Q8_0 rounds its activations to 8 bits too, per block of 32): at one row 1.4x and at prefill
# sizes 2.5x the speed of the ~16-bit variant (two passes), for about twice its KL to the bf16 model
# (benchmarks/quant_quality.py). The same for every row count, so a row's result never depends on its batch.
DECODER_ACTIVATION_BITS = 8
VISION_ACTIVATION_BITS = 8
# Without fbgemm (MoE experts, builds without it): from this many rows on, float32 GEMM over weight blocks upcast on
# the fly beats the int8 x bf16 kernel (K 3072 -> N 8192, one thread: 256 rows 133 vs 201 ms, 773 rows 304 vs 614 ms)
INT8_UPCAST_MIN_ROWS = 256
UPCAST_BLOCK = 1024  # output rows upcast at once (3072 inputs: 12 MB of float32)
VISION = "model.vision_embed_tokens."
ROUTER = "block_sparse_moe.gate"  # PhiMoE's router stays in float: 16 outputs that decide the top-2 experts


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> contiguous (M, K) starting on a 64-byte boundary (the CPU bf16 int8 kernel's aligned loads)."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    return x2d if x2d.data_ptr() % 64 == 0 else x2d.clone()


def _int8_op_ok(x2d: torch.Tensor, w: torch.Tensor) -> bool:
    if x2d.shape[0] == 0 or x2d.device != w.device:
        return False
    if x2d.device.type == "cpu" and x2d.dtype == torch.bfloat16:
        # the AVX512 kernel loads 16 values at a time along K from 32/16-byte aligned addresses
        return x2d.shape[1] % 16 == 0 and x2d.data_ptr() % 64 == 0 and w.data_ptr() % 64 == 0
    return x2d.device.type in ("cpu", "cuda") and x2d.shape[0] <= SMALL_M


def upcast_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T in float32, the weight upcast a block of output rows at a time (a transient copy of a few MB,
    not of the layer): where PyTorch's half-precision or int8 GEMM is slower than its float32 one."""
    x32 = x.float()
    return torch.cat([F.linear(x32, w.float()) for w in weight.split(UPCAST_BLOCK)], dim=-1)


def int8_matmul(x2d: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, K) @ (weight * scales[:, None]).T in x's dtype: the int8 kernel where it applies, float32 GEMM on
    weight blocks upcast on the fly for many half-precision rows on CPU (prefill), else a plain matmul."""
    if (x2d.shape[0] >= INT8_UPCAST_MIN_ROWS and x2d.dtype in (torch.bfloat16, torch.float16)
            and x2d.device.type == "cpu"):
        return (upcast_linear(x2d, weight) * scales.float()).to(x2d.dtype)
    s = scales.to(x2d.dtype)
    if _int8_op_ok(x2d, weight):
        return torch.ops.aten._weight_int8pack_mm(x2d, weight, s)
    return F.linear(x2d, weight.to(x2d.dtype)) * s  # int8 values are exact in bf16/fp16/fp32


def quantize_int8(w: torch.Tensor, dtype: torch.dtype):
    """Symmetric per output channel (last dim reduced): (..., N, K) -> int8 (..., N, K), scales (..., N) of dtype."""
    w = w.float()
    scales = (w.abs().amax(-1) / 127).to(dtype).clamp(min=torch.finfo(dtype).tiny)
    q = (w / scales.float()[..., None]).round().clamp(-128, 127)  # against the stored (rounded) scales
    return q.to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype):
    """Asymmetric per group of K (gpt-fast): (N, K) -> uint8 (N, K/2), scales_and_zeros (K/G, N, 2) of dtype."""
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).to(dtype).clamp(min=torch.finfo(dtype).tiny)
    zero = (lo + 8 * scale.float()).to(dtype)  # so that q = 0 is the group's minimum
    q = ((g - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15).to(torch.uint8)
    q = q.reshape(N, K)
    return q[:, 0::2] | (q[:, 1::2] << 4), torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


def unpack_int4(weight: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) two per byte -> uint8 (N, K) values 0..15."""
    return torch.stack([weight & 15, weight >> 4], dim=-1).reshape(weight.shape[0], -1)


def dequantize_int4(weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    q = unpack_int4(weight).float()
    N, K = q.shape
    s, z = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, K/G) each
    return ((q.view(N, -1, group_size) - 8) * s[..., None] + z[..., None]).view(N, K)


def _expect(t: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    if t.dtype != dtype:
        raise CheckpointError(f"{what} is {t.dtype}, not {dtype}: the checkpoint's weights do not match the "
                              "quantization entry of its config.json; re-create it with `phi3v quantize`")


class QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: sizes, an optional float bias, building from an nn.Linear, forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, lin: nn.Linear, pack: bool = True, **kw):
        """Quantize lin's weight (an empty module when lin is on the meta device); the float weight's pages, where
        they are a checkpoint's memory-mapped file, are given back (`release_pages`). `pack=False` leaves out the
        kernels' layouts (`phi3v quantize` only saves the checkpoint layout: a packed copy would double its memory)."""
        w = lin.weight
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, dtype=w.dtype, device=w.device, **kw)
        if not w.is_meta:
            m.set_weight(w.detach())
            release_pages(w)
            m.bias = None if lin.bias is None else lin.bias.detach()
            if pack:
                m.pack()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(_rows(x)).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class WeightOnlyInt8Linear(QuantizedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.bfloat16, device=None,
                 fbgemm: bool = True, activation_bits: int = DECODER_ACTIVATION_BITS, native: bool = True):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.fbgemm = fbgemm  # whether pack() may build fbgemm's packed copy (half-precision CPU layers)
        self.activation_bits = activation_bits  # of that GEMM: 8, or 16 (cpu_int8.matmul)
        self.native = native  # whether pack() may use phi3v's int8 x int8 kernel instead (8-bit activations)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("native_packed", None, persistent=False)  # the C++ kernel's layout, made by pack()
        self.register_buffer("native_scale", None, persistent=False)  # its float32 scales

    def set_weight(self, w: torch.Tensor) -> None:
        self.weight, self.scales = quantize_int8(w, w.dtype)

    def pack(self) -> None:
        """Half-precision CPU layers with 8-bit activations and `native` (the decoder's) get phi3v's int8 x int8
        kernel's layout (`native.int8_pack`: at 1-8 rows 1.2-1.5x fbgemm's speed, at prefill sizes 0.7-0.9x); the
        others (the vision tower's, whose many rows fbgemm runs faster, and 16-bit activations) fbgemm's packed
        copy (cpu_int8). Either is the one copy that every forward runs; a weight memory-mapped from the
        checkpoint gives its resident pages back after packing (`release_pages`: the saved int8 model then takes
        its weight bytes once). Without either the CPU int8 x bf16 kernel needs the weight on a 64-byte boundary
        (a memory-mapped tensor may not be on one)."""
        _expect(self.weight, torch.int8, "an int8 layer's weight")
        on_cpu = self.weight.device.type == "cpu" and self.in_features >= 2
        half = self.scales.dtype in (torch.bfloat16, torch.float16)  # float32 layers keep the exact kernel alone
        self.packed = self.native_packed = self.native_scale = None
        if (on_cpu and half and self.native and self.activation_bits == 8 and self.out_features % 16 == 0
                and self.in_features % 4 == 0 and native.ops() is not None):
            self.native_packed, self.native_scale = native.int8_pack(self.weight.contiguous()), self.scales.float()
            release_pages(self.weight)
            return
        self.packed = (cpu_int8.prepack(self.weight, self.scales, release=release_pages)
                       if on_cpu and half and self.fbgemm else None)
        if self.packed is None and (self.weight.data_ptr() % 64 or not self.weight.is_contiguous()):
            self.weight = self.weight.clone(memory_format=torch.contiguous_format)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.native_packed is not None and x2d.device.type == "cpu":
            # (.float(): a no-op, unless a model.to(dtype) cast the float32 scales)
            return native.int8_matmul(x2d, self.native_packed, self.native_scale.float()).to(x2d.dtype)
        packed = getattr(self, "packed", None)
        if packed is not None and x2d.device.type == "cpu" and self.weight.device.type == "cpu":
            return cpu_int8.matmul(x2d, packed, self.activation_bits, x2d.dtype)
        return int8_matmul(x2d, self.weight, self.scales)

    def _load_from_state_dict(self, *args, **kwargs):
        self.packed = self.native_packed = None  # copies of the old weight; pack_for_kernels packs the new one
        super()._load_from_state_dict(*args, **kwargs)


class WeightOnlyInt4Linear(QuantizedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.bfloat16, device=None,
                 group_size: int = 128):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=dtype,
                                                             device=device))
        self.register_buffer("packed", None, persistent=False)  # the kernel's layout, made by pack()
        self.register_buffer("native_sz", None, persistent=False)  # the C++ kernel's per-group terms
        self.packed_for = None  # what that layout is for: "native" (phi3v's C++ kernel), "cpu" or "cuda" (PyTorch's)

    @staticmethod
    def fits(lin: nn.Linear, group_size: int) -> bool:
        return lin.in_features % group_size == 0 and lin.out_features % INT4_N_MULTIPLE == 0

    def set_weight(self, w: torch.Tensor) -> None:
        self.weight, self.scales_and_zeros = quantize_int4(w, self.group_size, w.dtype)

    def pack(self) -> None:
        """Lay the weight out for the int4 kernel of the device it is on (a device-specific layout). Half-precision
        CPU layers run phi3v's C++ int4 x int8 GEMM (inputs rounded to int8 per row, like llama.cpp's Q4_0 x Q8_0)
        at every row count where it could be built, else PyTorch's int4 kernel."""
        _expect(self.weight, torch.uint8, "an int4 layer's weight")
        kind = self.weight.device.type
        half = self.scales_and_zeros.dtype in (torch.bfloat16, torch.float16)  # float32 layers keep exact kernels
        if kind == "cpu" and half and native.ops() is not None:  # one copy for every row count; file pages given back
            self.packed, self.native_sz = native.int4_pack(self.weight), native.int4_scales(self.scales_and_zeros)
            self.packed_for = "native"
            release_pages(self.weight)
            return
        q = unpack_int4(self.weight)
        if kind == "cpu":
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        elif kind == "cuda":  # tinygemm: uint8 (N, K/2) with k = 2j in the high nibble
            tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(q[:, 0::2] << 4 | q[:, 1::2], tiles)
        else:
            return
        self.packed_for = kind

    def _op_ok(self, x2d: torch.Tensor) -> bool:
        if self.packed is None or x2d.shape[0] == 0 or self.packed.device != x2d.device:
            return False
        if self.packed_for == "native":
            return x2d.device.type == "cpu"
        if x2d.device.type == "cuda":
            return self.packed_for == "cuda" and x2d.dtype == torch.bfloat16
        return self.packed_for == "cpu" and (x2d.dtype == torch.bfloat16 or x2d.shape[0] <= SMALL_M)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self._op_ok(x2d):
            if self.packed_for == "native":
                return native.int4_matmul(x2d, self.packed, self.native_sz, self.group_size).to(x2d.dtype)
            op = (torch.ops.aten._weight_int4pack_mm_for_cpu if x2d.device.type == "cpu"
                  else torch.ops.aten._weight_int4pack_mm)
            return op(x2d, self.packed, self.group_size, self.scales_and_zeros.to(x2d.dtype))
        return F.linear(x2d, dequantize_int4(self.weight, self.scales_and_zeros, self.group_size).to(x2d.dtype))


class Int8Experts(Experts):
    """PhiMoE's stacked experts with int8 weights per expert and output channel; Experts' routing, int8 matmuls."""

    NAMES = ("w1", "w2", "w3")

    def __init__(self, shapes: dict[str, tuple[int, int, int]], dtype=torch.bfloat16, device=None):
        nn.Module.__init__(self)  # buffers instead of Experts' float parameters
        for name, shape in shapes.items():  # w1, w3 (E, I, C); w2 (E, C, I)
            self.register_buffer(name, torch.empty(shape, dtype=torch.int8, device=device))
            self.register_buffer(f"{name}_scales", torch.empty(shape[:2], dtype=dtype, device=device))

    @classmethod
    def from_experts(cls, experts: Experts) -> Int8Experts:
        w1 = experts.w1
        m = cls({n: tuple(getattr(experts, n).shape) for n in cls.NAMES}, w1.dtype, w1.device)
        if not w1.is_meta:
            for n in cls.NAMES:
                q, s = quantize_int8(getattr(experts, n).detach(), w1.dtype)
                setattr(m, n, q)
                setattr(m, f"{n}_scales", s)
        return m

    def pack(self) -> None:
        for n in self.NAMES:
            _expect(getattr(self, n), torch.int8, f"experts.{n}")
            if getattr(self, n).data_ptr() % 64:
                setattr(self, n, getattr(self, n).clone())

    def _linear(self, h, name: str, e: int):
        return int8_matmul(h, getattr(self, name)[e], getattr(self, f"{name}_scales")[e])


QUANTIZED = (WeightOnlyInt8Linear, WeightOnlyInt4Linear, Int8Experts)


def check_scheme(scheme, group_size) -> None:
    if scheme not in SCHEMES:
        raise InputError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise InputError(f"int4 group size {group_size!r} is not one of {', '.join(map(str, GROUP_SIZES))}")


def quantize_model(model: nn.Module, scheme: str = "int8", group_size: int = 128, include_vision: bool = True,
                   skip=(), pack: bool = True) -> dict:
    """Swap the decoder's linear layers (the router excepted), PhiMoE's experts and, with include_vision, the CLIP
    tower's and img_projection's linears for quantized ones, in place; return the config.json spec. Layers named
    in `skip` or whose shape the int4 kernels cannot take stay as they are (listed in the spec's "skipped").
    On the meta device the new modules are empty: a quantized checkpoint is strictly loaded into them."""
    check_scheme(scheme, group_size)
    if any(isinstance(m, QUANTIZED) for m in model.modules()):
        raise InputError("the model is already quantized; quantize the float checkpoint instead")
    skipped, has_experts = [], False
    for name, m in list(model.named_modules()):
        if isinstance(m, Experts):
            new, has_experts = Int8Experts.from_experts(m), True
        elif not isinstance(m, nn.Linear) or name.endswith(ROUTER) or (not include_vision and name.startswith(VISION)):
            continue
        elif name in skip or (scheme == "int4" and not WeightOnlyInt4Linear.fits(m, group_size)):
            skipped.append(name)
            continue
        else:
            new = (WeightOnlyInt8Linear.from_linear(m, pack, activation_bits=_activation_bits(name),
                                                    native=not name.startswith(VISION)) if scheme == "int8"
                   else WeightOnlyInt4Linear.from_linear(m, pack, group_size=group_size))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    spec = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None,
            "include_vision": include_vision, "skipped": skipped}
    if has_experts:
        spec["experts"] = "int8"
    return spec


def quantize_from_spec(model: nn.Module, spec) -> dict:
    """Apply config.json's "quantization" entry to a model built on the meta device (before a strict load)."""
    try:
        if not isinstance(spec, dict):
            raise InputError(f"{spec!r} is not a dict with a scheme")
        check_scheme(spec.get("scheme"), spec.get("group_size"))
    except InputError as e:
        raise CheckpointError(f"config.json quantization entry: {e}. Re-create the folder with `phi3v quantize`") from e
    return quantize_model(model, spec["scheme"], spec.get("group_size"), spec.get("include_vision", True),
                          set(spec.get("skipped") or ()))


def _activation_bits(name: str) -> int:
    return VISION_ACTIVATION_BITS if name.startswith(VISION) else DECODER_ACTIVATION_BITS


def pack_for_kernels(model: nn.Module) -> nn.Module:
    """Build the quantized layers' kernel layouts on their current device (after loading or moving the model).
    The largest layers go first and the heap is trimmed after each: a layer's transient copy then never adds to
    the ones before, so loading a saved int8 checkpoint peaks near its weight bytes."""
    todo = [(name, m) for name, m in model.named_modules()
            if isinstance(m, QUANTIZED) and not next(m.buffers()).is_meta]
    todo.sort(key=lambda nm: -sum(b.numel() * b.element_size() for b in nm[1].buffers()))
    for name, m in todo:
        if isinstance(m, WeightOnlyInt8Linear):
            m.activation_bits, m.native = _activation_bits(name), not name.startswith(VISION)
        m.pack()
        trim_heap()  # a few ms; the freed copy would otherwise stay in the heap for the rest of the run
    return model

"""What this machine's CPU can do, read once from /proc/cpuinfo: the one place phi3v asks about CPU features; the C
heap's trim, for long-running processes, and its thresholds, for speed; giving back the pages of memory-mapped
files whose tensors were copied; and copies of weights on transparent huge pages."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import weakref
from pathlib import Path

NATIVE_BF16 = ("avx512_bf16", "amx_bf16")  # bfloat16 dot products in hardware
AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")  # what PyTorch's AVX512 kernels need


def _cpuinfo(keys: tuple[str, ...]) -> str | None:
    """The value of /proc/cpuinfo's first line starting with one of keys, or None (no such line, or not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags, or None where /proc/cpuinfo cannot be read (not Linux)."""
    flags = _cpuinfo(("flags", "Features"))  # x86 / ARM
    return None if flags is None else frozenset(flags.split())


@functools.cache
def cpu_vendor() -> str | None:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...), or None where it says none."""
    return _cpuinfo(("vendor_id",))


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


def auto_dtype(device: str, quantized: bool = False) -> str:
    """The dtype "auto" stands for on a device: bfloat16 on accelerators, on CPUs that prefer it and for int8/int4
    weights (their fast CPU kernels are the half-precision layers'; float32 quantized layers keep exact, slower
    kernels), else float32."""
    return "bfloat16" if device != "cpu" or quantized or cpu_prefers_bf16() else "float32"


@functools.cache
def _libc(name: str):
    """The C library's function `name` (glibc's malloc_trim, mallopt), or None where it has none."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim): freed tensors and buffers otherwise stay in
    the process's RSS. False where the C library has no such call (nothing is done)."""
    trim = _libc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


# glibc mallopt() options and the values keep_heap_pages() sets: blocks up to 64 MiB come from the heap instead of a
# fresh mmap each, and up to 256 MiB of freed heap stays mapped (trim_heap() still gives it back when asked)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
HEAP_SETTINGS = ((M_MMAP_THRESHOLD, 64 << 20), (M_TRIM_THRESHOLD, 256 << 20), (M_TOP_PAD, 64 << 20))
HEAP_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")  # the user's own glibc settings


@functools.cache
def keep_heap_pages() -> bool:
    """Let the C heap keep the pages of freed activations for the next forward (glibc mallopt, HEAP_SETTINGS).
    With glibc's defaults each prefill's multi-MiB activations come from fresh mappings whose pages fault in again
    every time (about 1,000-2,900 minor faults per 128-token prefill of an 8-layer Phi-3.5-mini; 0-600 after this),
    which cost 10-20% of a bf16 prefill on a 2-core VM. Once per process; PHI3V_KEEP_HEAP=0, a MALLOC_*_ variable of
    the user's, or a C library without mallopt leaves the heap alone (returns False)."""
    if os.environ.get("PHI3V_KEEP_HEAP", "1") == "0" or any(v in os.environ for v in HEAP_ENV):
        return False
    mallopt = _libc("mallopt")
    return mallopt is not None and all(mallopt(option, value) == 1 for option, value in HEAP_SETTINGS)


_MAPS: list[tuple[int, int, weakref.ref]] = []  # (address, length, the mmap) of the files registered below


def register_file_map(m: mmap.mmap, base: int) -> None:
    """Record a private, never written file mapping (checkpoint.safetensors maps checkpoints so) at address base."""
    _MAPS[:] = [e for e in _MAPS if e[2]() is not None]
    _MAPS.append((base, len(m), weakref.ref(m)))


def release_pages(t) -> int:
    """Give back the resident pages of a CPU tensor that is a view of a registered file mapping, once a copy of it is
    what runs (the int8 / int4 layers' packed weights): the file's pages would otherwise count twice in memory. The
    tensor stays valid: a later read (saving, LoRA) pages it in again from the file. Returns the bytes released; 0
    for any other tensor (nothing is done to it)."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return 0
    ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    for base, length, ref in _MAPS:
        m = ref()
        if m is not None and base <= ptr and ptr + nbytes <= base + length:
            page = mmap.PAGESIZE
            start = -(-(ptr - base) // page) * page  # whole pages inside the tensor: its neighbours keep theirs
            end = (ptr - base + nbytes) // page * page
            if end > start:
                m.madvise(mmap.MADV_DONTNEED, start, end - start)
            return max(0, end - start)
    return 0


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGE = 2 << 20  # what one transparent huge page maps on x86-64
COPY_ALIGN = 4096  # each copy starts on a page (the kernels need 64-byte alignment)


@functools.cache
def hugepages_on_request() -> bool:
    """Whether anonymous memory advised MADV_HUGEPAGE gets transparent huge pages here (Linux THP "always" or
    "madvise"); PHI3V_HUGEPAGES=0 says no."""
    if os.environ.get("PHI3V_HUGEPAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def hugepage_copies(tensors: list, put=None) -> list | None:
    """Contiguous copies of CPU tensors in one anonymous mapping advised for transparent huge pages (2 MiB pages:
    a decode step that streams gigabytes of weights then misses the TLB 512 times less often than on the 4 KiB pages
    of a memory-mapped checkpoint), each source's file pages given back once copied (`release_pages`, so memory
    holds the weights once). With put(i, copy), each copy is handed over as soon as it is made and the list's entry
    is cleared: a source held nowhere else (a heap copy such as a packed weight) is then freed and the heap trimmed
    before the next copy, so memory never holds two copies of more than one tensor. The copies keep the mapping
    alive. None (nothing done) without huge pages here."""
    import torch

    if not tensors or not hugepages_on_request() or any(t.device.type != "cpu" for t in tensors):
        return None
    sizes = [t.numel() * t.element_size() for t in tensors]
    total = sum(-(-n // COPY_ALIGN) * COPY_ALIGN for n in sizes)
    region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    offset = -whole.data_ptr() % HUGE_PAGE
    copies = []
    for i, n in enumerate(sizes):
        t = tensors[i]
        c = whole[offset:offset + n].view(t.dtype).view(t.shape)
        c.copy_(t)
        released = release_pages(t)
        copies.append(c)
        offset += -(-n // COPY_ALIGN) * COPY_ALIGN
        if put is not None:
            put(i, c)
            tensors[i] = t = None
            if not released:
                trim_heap()
    return copies

"""safetensors files read memory-mapped (by our own header parser: truncation is caught from the header) and
written 64-byte aligned; the weight files of a checkpoint folder, sharded or not."""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..hardware import register_file_map
from ..models.config import read_json

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """A .safetensors file mapped into memory: tensors are views of the file, nothing is read until used."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise CheckpointError(f"{path} is truncated ({size} bytes): re-download or re-create it")
                n = int.from_bytes(f.read(8), "little")
                if n > size - 8:
                    raise CheckpointError(f"{path} is truncated or not a safetensors file (header of {n} bytes)")
                header = json.loads(f.read(n))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
                if self._map:
                    register_file_map(self._map, torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr())
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd numbers or nesting
            raise CheckpointError(f"{path} is not a safetensors file (bad header: {type(e).__name__})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
        meta = header.pop("__metadata__", None)
        self.meta = meta if isinstance(meta, dict) else {}
        self.header, self.offset = header, 8 + n
        for name, info in header.items():
            _check_entry(path, name, info, size - self.offset)

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        shape = info["shape"]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(self._map, dtype=dtype, count=(end - start) // dtype.itemsize, offset=self.offset + start)
        return t.view(shape)


def _check_entry(path: Path, name: str, info, data_size: int) -> None:
    """A header entry as the format defines it: dtype, shape, and [start, end) inside the data, of the shape's size."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name[:100]!r} {why}: the file is corrupt; re-download or re-create it")

    if not isinstance(info, dict):
        raise bad("has no dtype/shape/data_offsets entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has a bad shape {str(shape)[:40]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has bad data_offsets {str(offsets)[:40]}")
    if offsets[1] > data_size:
        raise CheckpointError(f"{path} is truncated: tensor {name[:100]!r} ends at byte {offsets[1]} of its data, "
                              f"which has {data_size}; re-download or re-create it")
    if not isinstance(dtype, str):
        raise bad("has no dtype")
    torch_dtype = SAFETENSORS_DTYPES.get(dtype)
    if torch_dtype is not None and math.prod(shape) * torch_dtype.itemsize != offsets[1] - offsets[0]:
        raise bad(f"of shape {shape} and dtype {dtype} does not span its {offsets[1] - offsets[0]} bytes")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} listed in {index.name} is missing: {f} does not exist")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no weights in {model_dir}: expected model.safetensors or model.safetensors.index.json")
    return files


def read_state_dict(model_dir: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint (memory-mapped) whose names start with prefix, prefix stripped."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        st = SafetensorsFile(f)
        for k in st.keys():
            if k.startswith(prefix):
                state[k[len(prefix):]] = st.get(k)
    return state


ALIGN = 64  # tensors whose size is a multiple of this start at a multiple of it in the mapped file


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write one .safetensors file whose tensors are 64-byte aligned in memory once mapped (the header is
    padded, and tensors of a 64-multiple size come first), so kernels that need aligned weights (int8) can use
    the mapped file as it is instead of copying it."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    order = sorted(tensors, key=lambda k: (tensors[k].numel() * tensors[k].element_size() % ALIGN != 0, k))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for k in order:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in order:
            f.write(memoryview(tensors[k].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))


def save_safetensors(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 2 << 30) -> None:
    """Write a state dict as model.safetensors, or as shards plus model.safetensors.index.json."""
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v.contiguous(), size + nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(v.numel() * v.element_size() for v in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

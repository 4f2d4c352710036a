"""Checkpoint folders: find them (local path or the Hugging Face cache), read safetensors memory-mapped, load strictly."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import torch
from torch import nn

from .config import Phi3Config, read_json
from .errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16")
    return DTYPES[name]


def hf_cache_dirs() -> list[Path]:
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"])]
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return [home / "hub"]


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; a repo id like `microsoft/Phi-3.5-mini-instruct` from the local HF cache, no network."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    looked = []
    if name.count("/") == 1 and not path.exists():
        for hub in hf_cache_dirs():
            repo = hub / ("models--" + name.replace("/", "--"))
            looked.append(str(repo))
            snaps = repo / "snapshots"
            ref = repo / "refs" / "main"
            if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
                return snaps / ref.read_text().strip()
            if snaps.is_dir():
                found = sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime)
                if found:
                    return found[-1]
    where = f" nor in the Hugging Face cache ({', '.join(looked)})" if looked else ""
    raise CheckpointError(
        f"model {name!r} is not a local folder{where}. Pass a folder with config.json and *.safetensors, "
        "or download the repo with `huggingface-cli download` on a machine with network first"
    )


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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a safetensors file (bad header: {e})") from e
        self.meta = header.pop("__metadata__", None) or {}
        self.header, self.offset = header, 8 + n
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if self.offset + end > size:
            raise CheckpointError(
                f"{path} is truncated: it has {size} bytes but its header describes {self.offset + end}; "
                "re-download or re-create it"
            )

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


def load_into(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, where: Path) -> nn.Module:
    """Strictly load `state` into a model built on the meta device: every key and shape must match."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"weights in {where} do not match config.json: " + "; ".join(parts))
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"weight {k} in {where} has shape {tuple(state[k].shape)} but config.json implies {tuple(t.shape)}"
            )
    state = {k: (v if v.dtype == dtype or not v.is_floating_point() else v.to(dtype)) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


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


def build_model(cfg: Phi3Config, raw: dict | None = None):
    """The model class for a config (on the current default device): text decoder or Phi-3-vision."""
    from .model import CausalLM
    from .multimodal import Phi3VForCausalLM, is_vision_config
    from .vision import ImageEmbeddingConfig

    if raw is not None and is_vision_config(raw):
        return Phi3VForCausalLM(cfg, ImageEmbeddingConfig.from_config(raw))
    return CausalLM(cfg)


def load_causal_lm(model_dir: Path, cfg: Phi3Config, dtype: torch.dtype = torch.float32, device="cpu",
                   raw: dict | None = None):
    """Build the model on the meta device and load the checkpoint's weights into it strictly."""
    with torch.device("meta"):
        model = build_model(cfg, raw)
    quantized = raw is not None and "quantization" in raw
    if quantized:  # empty quantized modules, named as the checkpoint's tensors, before the strict load
        from .quantize import pack_for_kernels, quantize_from_spec

        quantize_from_spec(model, raw["quantization"])
    state = type(model).sanitize(cfg, read_state_dict(model_dir))
    if cfg.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    load_into(model, state, dtype, model_dir)
    model.rotary = type(model.rotary)(cfg)  # non-persistent buffers are rebuilt, not loaded
    model = model.to(device).eval()
    return pack_for_kernels(model) if quantized else model  # kernel layouts are device specific: built here

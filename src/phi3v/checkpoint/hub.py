"""Where a checkpoint lives: a local folder, or a repo id in the local Hugging Face cache."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError


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

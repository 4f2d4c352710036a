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


# what a checkpoint folder needs; the reference's remote code (*.py) and other formats are not downloaded
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def offline() -> bool:
    """Hugging Face's own switch: HF_HUB_OFFLINE=1 means no network is tried."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached_snapshot(name: str) -> tuple[Path | None, list[str]]:
    """The newest snapshot of repo `name` in the local Hugging Face cache, and the folders looked in."""
    looked = []
    for hub in hf_cache_dirs():
        repo = hub / ("models--" + name.replace("/", "--"))
        looked.append(str(repo))
        snaps = repo / "snapshots"
        ref = repo / "refs" / "main"
        if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
            return snaps / ref.read_text().strip(), looked
        if snaps.is_dir():
            found = sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1], looked
    return None, looked


def download(name: str) -> Path:
    """Download repo `name`'s checkpoint files into the Hugging Face cache (with huggingface_hub's progress bars)."""
    from huggingface_hub import snapshot_download

    cache = hf_cache_dirs()[0]
    return Path(snapshot_download(name, cache_dir=cache, allow_patterns=DOWNLOAD_PATTERNS))


def resolve_model_dir(name_or_path: str | os.PathLike, allow_download: bool = True) -> Path:
    """A local folder as is; a repo id like `microsoft/Phi-3.5-mini-instruct` from the local HF cache, or else
    downloaded into it when the network allows (not with HF_HUB_OFFLINE=1)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    looked, why = [], ""
    if name.count("/") == 1 and not path.exists():
        snap, looked = _cached_snapshot(name)
        if snap is not None:
            return snap
        if allow_download and not offline():
            try:
                return download(name)
            except Exception as e:  # no network, unknown repo, gated repo, disk full: all end in the same advice
                why = f"; downloading it failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        elif allow_download:
            why = "; HF_HUB_OFFLINE is set, so it was not downloaded"
    where = f" nor in the Hugging Face cache ({', '.join(looked)})" if looked else ""
    raise CheckpointError(
        f"model {name!r} is not a local folder{where}{why}. Pass a folder with config.json and *.safetensors, "
        "or download the repo with `huggingface-cli download` on a machine with network first"
    )

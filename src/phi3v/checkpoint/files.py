"""The non-weight files of a checkpoint folder that travel with it (tokenizer, generation and processor configs)."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "preprocessor_config.json", "processor_config.json")


def copy_tokenizer_files(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the TOKENIZER_FILES that src_dir has into out_dir; returns the names copied."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / name)
            copied.append(name)
    return copied

"""Training: one loop with the loss as a plug-in (SFT, pretraining; DPO and adapters plug in), atomic resumable
checkpoints, Hugging Face export. `phi3v train ...` and `python -m phi3v.train ...` run the recipe in run.py."""

from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]

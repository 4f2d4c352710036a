"""phi3v: run, serve and train Microsoft's Phi-3 family (Phi-3(.5)-vision, Phi-3.5-mini, Phi-3.5-MoE) in PyTorch."""

from .errors import CheckpointError, ContextLengthError, InputError, Phi3VError

__version__ = "0.1.0"
__all__ = ["load", "example_image", "Phi3VError", "CheckpointError", "InputError", "ContextLengthError", "__version__"]


def load(name_or_path=None, dtype="auto", device="cpu", quantize=None):
    """Load a checkpoint folder (or a Hugging Face repo id); with no argument, the bundled phi3v-nano model.
    See phi3v.api.Phi3Model for generate / stream / chat."""
    from .api import load as _load

    return _load(name_or_path, dtype=dtype, device=device, quantize=quantize)


def example_image():
    """Path of the bundled example image (a small synthetic bar chart)."""
    from .examples import example_image as _example

    return _example()

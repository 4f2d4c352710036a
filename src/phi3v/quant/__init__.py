"""Weight-only quantization: int8 / int4 layers swapped in from outside the model (the converter that writes a
quantized checkpoint folder is phi3v.checkpoint.quantized)."""

from .layers import GROUP_SIZES, SCHEMES

__all__ = ["GROUP_SIZES", "SCHEMES"]

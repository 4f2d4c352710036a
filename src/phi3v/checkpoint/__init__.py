"""Checkpoint folders: safetensors I/O, local / Hugging Face cache resolution, strict loading, random and
quantized checkpoints."""

"""Training data: JSONL records, rendering into samples, the batched Phi-3-V collator, a resumable loader."""

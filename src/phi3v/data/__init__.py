"""Training and evaluation data: JSONL records, rendering into samples, the batched Phi-3-V collator, a resumable
loader, and the synthetic document set (synth/).
"""

"""The Python API: `phi3v.load(path)` returns a model that generates, chats and streams text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .config import config_from_dict, read_json
from .errors import InputError
from .generate import Prompt, generate_steps
from .loader import load_causal_lm, parse_dtype, resolve_model_dir
from .random_checkpoint import RANDOM_MARKER
from .sampling import SamplingParams
from .tokenizer import Tokenizer

Messages = list[dict]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or stop string) or "length"

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "finish_reason": self.finish_reason}


class TextRow:
    """Turns one row's tokens into text deltas: never splits a character, holds back a possible stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stop = stop
        self.text, self.sent = "", 0
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    def push(self, token: int, finish_reason: str | None, stop_ids: frozenset[int]) -> str:
        self.token_ids.append(token)
        if token not in stop_ids:
            self.text += self.decoder.push(token)
        if finish_reason is not None:
            self.text += self.decoder.flush()
        self.finish_reason = finish_reason
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.finish_reason = self.text[:min(hits)], "stop"
        keep = 0 if self.finish_reason else self._held_back()
        delta = self.text[self.sent:len(self.text) - keep]
        self.sent += len(delta)
        return delta

    def _held_back(self) -> int:
        """Length of the longest end of the text that could still grow into a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best


class Phi3Model:
    """A loaded checkpoint: decoder, tokenizer and generation defaults."""

    def __init__(self, model, tokenizer: Tokenizer, path: Path, is_random: bool = False):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.config = model.config
        self.is_random = is_random  # weights made by `phi3v create-random`: the output means nothing

    @classmethod
    def load(cls, name_or_path: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu") -> Phi3Model:
        path = resolve_model_dir(name_or_path)
        raw = read_json(path / "config.json", "config.json")
        cfg = config_from_dict(raw)
        tokenizer = Tokenizer.from_dir(path)
        if dtype == "auto":
            dtype = "bfloat16" if device != "cpu" or _cpu_has_bf16() else "float32"
        model = load_causal_lm(path, cfg, parse_dtype(dtype), device)
        return cls(model, tokenizer, path, bool(raw.get(RANDOM_MARKER)))

    # ---- prompts ----
    def render(self, prompt: str | Messages, system: str | None = None, raw: bool = False) -> list[int]:
        """Token ids of a prompt: a user message (plus optional system turn) or a whole conversation."""
        if raw:
            if not isinstance(prompt, str):
                raise InputError("raw prompts must be strings")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if system is not None:
            prompt = [{"role": "system", "content": system}, *prompt]
        return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)

    # ---- generation ----
    def stream_batch(self, prompts: list[list[int]], params: SamplingParams,
                     max_context: int | None = None) -> Iterator[tuple[int, str, TextRow]]:
        """Yield (row, text delta, row state) as tokens arrive for a batch of tokenized prompts."""
        stop_ids = self.tokenizer.stop_token_ids
        rows = [TextRow(self.tokenizer, params.stop) for _ in prompts]
        done = [False] * len(prompts)
        gen = generate_steps(self.model, [Prompt(p) for p in prompts], params, stop_ids, max_context)
        for steps in gen:
            for s in steps:
                if done[s.row]:
                    continue
                row = rows[s.row]
                delta = row.push(s.token, s.finish_reason, stop_ids)
                done[s.row] = row.finish_reason is not None
                yield s.row, delta, row
            if all(done):
                gen.close()
                return

    def generate_batch(self, prompts: list[str | Messages], system: str | None = None, raw: bool = False,
                       **sampling) -> list[Completion]:
        params = SamplingParams(**sampling)
        ids = [self.render(p, system, raw) for p in prompts]
        rows: dict[int, object] = {}
        for b, _, row in self.stream_batch(ids, params):
            rows[b] = row
        return [Completion(rows[b].text, rows[b].token_ids, len(ids[b]), rows[b].finish_reason or "length")
                if b in rows else Completion("", [], len(ids[b]), "length") for b in range(len(ids))]

    def generate(self, prompt: str | Messages, system: str | None = None, raw: bool = False, **sampling) -> Completion:
        """Complete one prompt. Sampling keywords: max_new_tokens, temperature, top_p, top_k, seed, stop, ..."""
        return self.generate_batch([prompt], system, raw, **sampling)[0]

    def stream(self, prompt: str | Messages, system: str | None = None, raw: bool = False, **sampling) -> Iterator[str]:
        """Text deltas of one completion as they are generated."""
        params = SamplingParams(**sampling)
        for _, delta, _ in self.stream_batch([self.render(prompt, system, raw)], params):
            if delta:
                yield delta

    def chat(self, messages: Messages, **sampling) -> Completion:
        """Answer the last user turn of a conversation; append {'role': 'assistant', ...} yourself to go on."""
        return self.generate(messages, **sampling)


def _cpu_has_bf16() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    except Exception:  # older torch
        return False


def load(name_or_path: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu") -> Phi3Model:
    """Load a checkpoint folder (or a repo id already in the local Hugging Face cache)."""
    return Phi3Model.load(name_or_path, dtype, device)

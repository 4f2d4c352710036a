"""The Python API: `phi3v.load(path)` returns a model that generates, chats and streams text."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint.hub import resolve_model_dir
from .checkpoint.load import load_causal_lm, parse_dtype
from .checkpoint.random import RANDOM_MARKER
from .errors import InputError
from .examples import nano_dir
from .hardware import auto_dtype, keep_heap_pages
from .inference.engine import Engine
from .inference.generate import generate_steps
from .inference.kernels import use_fast_bf16_linears, use_fast_decode_attention, use_hugepage_weights
from .inference.requests import Prompt, check_prompt_fits
from .inference.sampling import SamplingParams
from .models import config_from_dict, is_vision_config
from .models.config import read_json
from .models.phi3_v import recomputes_on_long_switch
from .processing.image import ImageProcessor
from .processing.prompts import tokenize_with_images, with_image_tags
from .processing.tokenizer import Tokenizer
from .quant.layers import quantize_model

Messages = list[dict]
FEATURE_CACHE_IMAGES = 16  # projected features of this many recent images are kept for multi-turn chats


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
    """A loaded checkpoint: model, tokenizer, and for Phi-3(.5)-vision the image processor."""

    def __init__(self, model, tokenizer: Tokenizer, path: Path, is_random: bool = False,
                 processor: ImageProcessor | None = None):
        self.model, self.tokenizer, self.path, self.processor = model, tokenizer, path, processor
        self.config = model.config
        self.is_random = is_random  # weights made by `phi3v create-random`: the output means nothing
        self.recompute_on_long_switch = processor is None or recomputes_on_long_switch(path)
        self._features: dict[str, torch.Tensor] = {}  # image digest -> projected features (recent images)
        self._engine: Engine | None = None

    @classmethod
    def load(cls, name_or_path: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu",
             quantize: str | None = None) -> Phi3Model:
        path = resolve_model_dir(name_or_path)
        if str(device).startswith("cpu"):
            keep_heap_pages()  # CPU activations reuse heap pages instead of faulting fresh ones in every forward
        raw = read_json(path / "config.json", "config.json")
        cfg = config_from_dict(raw)
        tokenizer = Tokenizer.from_dir(path)
        processor = ImageProcessor.from_dir(path) if is_vision_config(raw) else None
        if dtype == "auto":
            dtype = auto_dtype(device, quantized=bool(quantize or raw.get("quantization")))
        model = load_causal_lm(path, cfg, parse_dtype(dtype), device, raw=raw)
        if quantize:
            quantize_model(model, quantize)
        use_fast_bf16_linears(model)  # no-op unless bf16 weights on a CPU whose bf16 GEMM is slow (no AMX)
        use_hugepage_weights(model)  # those layers' weights on transparent huge pages, where the OS has them
        use_fast_decode_attention(model)  # one-token attention against a bf16 cache (applies only there)
        return cls(model, tokenizer, path, bool(raw.get(RANDOM_MARKER)), processor)

    @property
    def is_vision(self) -> bool:
        return self.processor is not None

    # ---- prompts ----
    def _messages(self, prompt: str | Messages, system: str | None, images: list | None) -> Messages:
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list):
            raise InputError("a prompt is a string or a list of {'role', 'content'} messages")
        msgs = [dict(m) if isinstance(m, dict) else m for m in prompt]
        if images:
            users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
            if not users:
                raise InputError("images need a user message to attach to")
            users[-1]["images"] = list(users[-1].get("images") or []) + list(images)
        if system is not None:
            msgs = [{"role": "system", "content": system}, *msgs]
        return msgs

    def prepare(self, prompt: str | Messages, system: str | None = None, raw: bool = False, images: list | None = None,
                num_crops: int | None = None, max_context: int | None = None) -> Prompt:
        """Token ids (and, with images, embeddings) of a prompt: a user message or a whole conversation.

        Images belong to the message whose "images" list holds them (`images=` attaches them to the last user
        turn); a message whose content has no <|image_N|> tags gets them prepended, numbered across the
        conversation.
        """
        if raw:
            if not isinstance(prompt, str):
                raise InputError("raw prompts must be strings")
            text, all_images = with_image_tags(prompt, 1, len(images or [])), list(images or [])
        else:
            msgs = self._messages(prompt, system, images)
            all_images = []
            for m in msgs:
                if isinstance(m, dict) and m.get("images"):
                    m["content"] = with_image_tags(str(m.get("content", "")), len(all_images) + 1, len(m["images"]))
                    all_images += m.pop("images")
        if not self.is_vision:
            if all_images:
                raise InputError(f"{self.path} is a text model: it cannot take images")
            ids = self.tokenizer.encode(text) if raw else self.tokenizer.apply_chat_template(msgs)
            return Prompt(self._check_fits(ids, max_context))
        if not raw:  # the reference processor tokenizes the rendered text itself, chunk by chunk around images
            text = self.tokenizer.apply_chat_template([_plain(m) for m in msgs], tokenize=False)
        processed = self.processor(all_images, num_crops=num_crops) if all_images else None
        counts = processed["num_img_tokens"] if processed else []
        ids = self._check_fits(tokenize_with_images(self.tokenizer, text, counts), max_context)
        if not processed:
            return Prompt(ids)
        digests = [_digest(pv, size) for pv, size in zip(processed["pixel_values"], processed["image_sizes"])]
        feats = [self._image_features(d, pv, size)
                 for d, pv, size in zip(digests, processed["pixel_values"], processed["image_sizes"])]
        device = next(self.model.parameters()).device
        with torch.no_grad():
            embeds = self.model.embed(torch.tensor([ids], device=device), features=feats)
        # the engine's prefix reuse must tell images apart, not just their placeholder ids
        key = [(t, digests[-t - 1]) if t < 0 else t for t in ids]
        return Prompt(ids, embeds[0], key)

    def _image_features(self, digest: str, pixel_values, image_size) -> torch.Tensor:
        """Projected features of one processed image, remembered for the next turns of a chat."""
        if digest not in self._features:
            device = next(self.model.parameters()).device
            with torch.no_grad():
                f = self.model.model.vision_embed_tokens(pixel_values[None].to(device), image_size[None])[0]
            self._features[digest] = f
            while len(self._features) > FEATURE_CACHE_IMAGES:
                self._features.pop(next(iter(self._features)))
        return self._features[digest]

    def _check_fits(self, ids: list[int], max_context: int | None) -> list[int]:
        check_prompt_fits(len(ids), self.config, max_context)  # before any image goes through CLIP
        return ids

    def render(self, prompt: str | Messages, system: str | None = None, raw: bool = False, **kw) -> list[int]:
        """Token ids of a prompt (image placeholders are negative ids)."""
        return self.prepare(prompt, system, raw, **kw).ids

    # ---- generation ----
    def engine(self, max_batch: int = 1, max_context: int = 8192, kv_budget: int | None = None,
               prefill_chunk: int = 512) -> Engine:
        """The model's long-lived engine, made on first use: its cache keeps the last conversations, so the
        next turn of a chat only computes its new tokens."""
        if self._engine is None:
            self._engine = Engine(self.model, max_batch, max_context, prefill_chunk, self.recompute_on_long_switch,
                                  kv_budget)
        return self._engine

    def stream_batch(self, prompts: list[Prompt], params: SamplingParams, max_context: int | None = None,
                     engine: Engine | None = None) -> Iterator[tuple[int, str, TextRow]]:
        """Yield (row, text delta, row state) as tokens arrive for a batch of prepared prompts."""
        stop_ids = self.tokenizer.stop_token_ids
        rows = [TextRow(self.tokenizer, params.stop) for _ in prompts]
        done = [False] * len(prompts)
        prompts = [p if isinstance(p, Prompt) else Prompt(list(p)) for p in prompts]
        gen = generate_steps(self.model, prompts, params, stop_ids, max_context, self.recompute_on_long_switch, engine)
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
                       images: list | None = None, num_crops: int | None = None, max_context: int | None = None,
                       engine: Engine | None = None, **sampling) -> list[Completion]:
        """Complete several prompts together (one batch); `images` are shared by every prompt."""
        params = SamplingParams(**sampling)
        max_context = _within_engine(max_context, engine)
        prepared = [self.prepare(p, system, raw, images, num_crops, max_context) for p in prompts]
        rows: dict[int, TextRow] = {}
        for b, _, row in self.stream_batch(prepared, params, max_context, engine):
            rows[b] = row
        return [Completion(rows[b].text, rows[b].token_ids, len(p.ids), rows[b].finish_reason or "length")
                if b in rows else Completion("", [], len(p.ids), "length") for b, p in enumerate(prepared)]

    def generate(self, prompt: str | Messages, system: str | None = None, raw: bool = False, **kw) -> Completion:
        """Complete one prompt. Keywords: images, num_crops, max_context, and the SamplingParams fields
        (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop)."""
        return self.generate_batch([prompt], system, raw, **kw)[0]

    def stream(self, prompt: str | Messages, system: str | None = None, raw: bool = False, images: list | None = None,
               num_crops: int | None = None, max_context: int | None = None, engine: Engine | None = None,
               **sampling) -> Iterator[str]:
        """Text deltas of one completion as they are generated."""
        params = SamplingParams(**sampling)
        max_context = _within_engine(max_context, engine)
        prepared = self.prepare(prompt, system, raw, images, num_crops, max_context)
        for _, delta, _ in self.stream_batch([prepared], params, max_context, engine):
            if delta:
                yield delta

    def chat(self, messages: Messages, **kw) -> Completion:
        """Answer the last user turn of a conversation; messages may carry "images" lists. Append the
        {'role': 'assistant', 'content': ...} turn yourself to go on. Runs on the model's engine, so the
        conversation so far is not computed again."""
        return self.generate(messages, engine=self.engine(), **kw)

    def chat_stream(self, messages: Messages, **kw) -> Iterator[str]:
        """As chat(), as text deltas."""
        return self.stream(messages, engine=self.engine(), **kw)


def _within_engine(max_context: int | None, engine: Engine | None) -> int | None:
    """The token budget of a request on `engine`: never past its slots' max_context."""
    if engine is None:
        return max_context
    return min(max_context or engine.max_context, engine.max_context)


def _digest(pixel_values: torch.Tensor, image_size: torch.Tensor) -> str:
    h = hashlib.sha1(pixel_values.float().numpy().tobytes())
    h.update(bytes(str(image_size.tolist()), "ascii"))
    return h.hexdigest()


def _plain(m):
    return {k: v for k, v in m.items() if k != "images"} if isinstance(m, dict) else m


def load(name_or_path: str | Path | None = None, dtype: str | torch.dtype = "auto", device: str = "cpu",
         quantize: str | None = None) -> Phi3Model:
    """Load a checkpoint folder (or a Hugging Face repo id); None: the bundled phi3v-nano. quantize: int8 | int4."""
    return Phi3Model.load(nano_dir() if name_or_path is None else name_or_path, dtype, device, quantize)

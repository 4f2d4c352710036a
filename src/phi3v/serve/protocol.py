"""What goes in and out of the server: OpenAI request bodies (pydantic) and their images, responses and SSE chunks."""

from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Callable, Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InputError
from ..inference.sampling import SamplingParams
from ..processing.image import decode_data_url, load_image

MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20  # as OpenAI (chat); completions allow 5
MAX_STOP = 4  # stop strings per request, as OpenAI

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "server_error"}


class APIError(Exception):
    """An error answered as OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- requests

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use (user, metadata, ...) are accepted


class ImageURL(_Body):
    url: str
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object"]


class Sampling(_Body):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1, as OpenAI
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions, as vLLM names them
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_new_tokens: int) -> list[SamplingParams]:
        """One per choice; choice i is seeded with seed + i."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP or not all(stop):
            raise APIError(400, f"stop takes at most {MAX_STOP} non-empty strings", "stop")
        try:
            return [SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0 if self.temperature is None
                                   else self.temperature, top_p=self.top_p or 1.0, top_k=self.top_k,
                                   repetition_penalty=self.repetition_penalty,
                                   seed=None if self.seed is None else self.seed + i, stop=stop)
                    for i in range(self.n)]
        except InputError as e:
            raise APIError(400, str(e)) from e


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None


# --------------------------------------------------------------------------- images

def chat_messages(messages: list[ChatMessage]) -> tuple[list[dict], int]:
    """OpenAI messages -> phi3v messages whose "images" lists hold the image URLs; and the number of images."""
    out, n_images = [], 0
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            out.append({"role": role, "content": m.content or ""})
            continue
        texts = [p.text for p in m.content if p.type == "text"]
        urls = [p.image_url.url for p in m.content if p.type == "image_url"]
        if urls and role != "user":
            raise APIError(400, f"messages[{i}]: only user messages can carry images", f"messages[{i}].content")
        out.append({"role": role, "content": "\n".join(texts), **({"images": urls} if urls else {})})
        n_images += len(urls)
    return out, n_images


def _image_bytes(url: str, allow_dirs: tuple[Path, ...]) -> tuple[bytes, str]:
    """The encoded bytes of an image_url and a name for messages: data: URLs, and file:// inside allow_dirs."""
    if url.startswith("data:"):
        return decode_data_url(url), "image data URL"
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        raise APIError(400, f"image URLs over {scheme} are not fetched (this server may have no network): send the "
                            "image inline as a base64 'data:image/...;base64,...' URL", "messages", "image_url_refused")
    if scheme != "file":
        raise APIError(400, f"unsupported image URL {url[:60]!r}: send a base64 data: URL or a file:// URL", "messages")
    path = Path(unquote(urlparse(url).path)).resolve()
    if not any(path.is_relative_to(Path(d).resolve()) for d in allow_dirs):
        where = ", ".join(map(str, allow_dirs)) or "none: start the server with --allow-dir DIR"
        raise APIError(400, f"file URL {path} is outside the folders this server may read ({where})", "messages",
                       "image_url_refused")
    if not path.is_file():
        raise APIError(400, f"image file not found: {path}", "messages")
    return path.read_bytes(), f"image file {path}"


def load_request_image(url: str, allow_dirs: tuple[Path, ...], max_pixels: int):
    """A decoded RGB image; 413 over max_pixels (read from the header, before decoding), 400 if it is not an image
    or is truncated (phi3v's InputError, from load_image)."""
    from PIL import Image

    data, name = _image_bytes(url, allow_dirs)
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise APIError(413, f"{name} is too large to decode ({e})", "messages", "image_too_large") from e
    except (OSError, SyntaxError, ValueError):  # not an image: load_image says so below
        width = height = 0
    if width * height > max_pixels:
        raise APIError(413, f"{name} is {width}x{height} = {width * height} pixels, over this server's limit of "
                            f"{max_pixels}; downscale it", "messages", "image_too_large")
    return load_image(data, max_pixels)


# --------------------------------------------------------------------------- responses

@dataclass
class Out:
    """One generated token of one choice, as the engine thread sends it to the asyncio side."""

    index: int
    text: str
    token: int
    finish_reason: str | None
    logprob: float | None
    top_logprobs: list | None
    n_tokens: int  # tokens generated so far by this choice


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprob(label, token: int, logprob: float, top: list | None) -> dict:
    """One entry of a chat choice's logprobs.content; label: token id -> (text, UTF-8 bytes)."""
    def entry(t, lp):
        text, raw = label(t)
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top or []]}


def completion_logprobs(label, items: list[tuple], offset: int) -> dict:
    """/v1/completions logprobs of [(token, logprob, [(token, logprob), ...]), ...]; offset: where the text starts."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp, top in items:
        text = label(token)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({label(t)[0]: v for t, v in top or []})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


@cache
def token_labels(tokenizer) -> list[tuple[str, bytes]]:
    """(text, UTF-8 bytes) of every token id, for logprobs; a non-ASCII byte token's text is `bytes:\\xNN`."""
    return [(text if text is not None else f"bytes:\\x{raw[0]:02x}", raw) for text, raw in tokenizer.vocab_pieces()]


@dataclass
class Reply:
    """What every object of one response shares. batches: async iterator of lists of Out."""

    kind: str  # "chat" or "completion"
    model: str
    label: Callable[[int], tuple[str, bytes]]  # token id -> (text, bytes)
    n: int
    prompt_tokens: int
    logprobs: bool
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = self.id or new_id("chatcmpl" if self.kind == "chat" else "cmpl")
        self.created = self.created or int(time.time())

    def wrap(self, choices: list, usage_: dict | None = None, chunk: bool = False) -> dict:
        obj = "text_completion" if self.kind != "chat" else "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "usage": usage_, "system_fingerprint": None}

    async def complete(self, batches) -> dict:
        """The whole response, once every choice has finished."""
        choices = [{"text": "", "logprobs": [], "finish_reason": None, "n_tokens": 0} for _ in range(self.n)]
        async for batch in batches:
            for o in batch:
                c = choices[o.index]
                c["text"] += o.text
                c["n_tokens"], c["finish_reason"] = o.n_tokens, o.finish_reason
                if o.logprob is not None:
                    c["logprobs"].append((o.token, o.logprob, o.top_logprobs))
        out = []
        for i, c in enumerate(choices):
            if self.kind == "chat":
                lp = {"content": [chat_logprob(self.label, *e) for e in c["logprobs"]]} if self.logprobs else None
                out.append({"index": i, "message": {"role": "assistant", "content": c["text"]}, "logprobs": lp,
                            "finish_reason": c["finish_reason"]})
            else:
                lp = completion_logprobs(self.label, c["logprobs"], 0) if self.logprobs else None
                out.append({"index": i, "text": c["text"], "logprobs": lp, "finish_reason": c["finish_reason"]})
        return self.wrap(out, usage(self.prompt_tokens, sum(c["n_tokens"] for c in choices)))

    async def stream(self, batches, include_usage: bool):
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]` (after an error object if the
        generation fails midway)."""
        try:
            async for event in self._events(batches, include_usage):
                yield event
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    async def _events(self, batches, include_usage: bool):
        chat = self.kind == "chat"
        n_tokens, offsets = [0] * self.n, [0] * self.n
        if chat:
            for i in range(self.n):
                yield _sse(self.wrap([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None}], chunk=True))
        async for batch in batches:
            for o in batch:
                n_tokens[o.index] = o.n_tokens
                lp = None
                if self.logprobs and o.logprob is not None:
                    lp = {"content": [chat_logprob(self.label, o.token, o.logprob, o.top_logprobs)]} if chat else \
                        completion_logprobs(self.label, [(o.token, o.logprob, o.top_logprobs)], offsets[o.index])
                offsets[o.index] += len(o.text)
                if chat and (o.text or lp):
                    yield _sse(self.wrap([{"index": o.index, "delta": {"content": o.text}, "logprobs": lp,
                                           "finish_reason": None}], chunk=True))
                if chat and o.finish_reason:
                    yield _sse(self.wrap([{"index": o.index, "delta": {}, "logprobs": None,
                                           "finish_reason": o.finish_reason}], chunk=True))
                if not chat and (o.text or lp or o.finish_reason):
                    yield _sse(self.wrap([{"index": o.index, "text": o.text, "logprobs": lp,
                                           "finish_reason": o.finish_reason}]))
        if include_usage:
            yield _sse(self.wrap([], usage(self.prompt_tokens, sum(n_tokens)), chunk=True))


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

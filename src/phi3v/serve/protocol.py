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
from ..inference.sampling import SEED_RANGE, SamplingParams
from ..processing.image import decode_data_url
from ..processing.tokenizer import literal

MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20  # as OpenAI (chat); completions allow 5
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_STOP_CHARS = 256  # each stop string is searched for after every token
PENALTY_RANGE = (0.01, 100.0)  # repetition_penalty: beyond these, logits overflow or vanish
MIN_LOGPROB = -9999.0  # what OpenAI reports for tokens that cannot be drawn; JSON has no -Infinity
MAX_ECHO = 64  # characters of a client's value that an error message may quote

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error"}


def quote(value: str) -> str:
    """A client's string as an error message may show it: repr, cut to MAX_ECHO characters."""
    return repr(value) if len(value) <= MAX_ECHO else repr(value[:MAX_ECHO]) + f"... ({len(value)} characters)"


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
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1, as OpenAI; below 1e-5: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])  # choice i uses seed + i: also in range
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions, as vLLM names them
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    ignore_eos: bool = False

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_new_tokens: int) -> list[SamplingParams]:
        """One per choice; choice i is seeded with seed + i."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP or not all(0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise APIError(400, f"stop takes at most {MAX_STOP} non-empty strings of up to {MAX_STOP_CHARS} "
                                "characters", "stop")
        if self.seed is not None and self.seed + self.n - 1 > SEED_RANGE[1]:
            raise APIError(400, f"seed + n - 1 = {self.seed + self.n - 1} is over {SEED_RANGE[1]} (choice i is "
                                "seeded with seed + i): lower the seed", "seed")
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
    # declared so that they are refused (check_unsupported), not silently ignored
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    function_call: str | dict | None = None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check_unsupported(self) -> None:
        """400 for tool calling, which this server does not do (rather than answering as if no tools were given)."""
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise APIError(400, f"{name} are not supported by this server (no tool calling): send the request "
                                    f"without {name!r}", name, "unsupported_parameter")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise APIError(400, f"{name} is not supported by this server (no tool calling)", name,
                               "unsupported_parameter")


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None


# --------------------------------------------------------------------------- images

def chat_messages(messages: list[ChatMessage], control_tokens: bool = False) -> tuple[list[dict], int]:
    """OpenAI messages -> phi3v messages whose "images" lists hold the image URLs; and the number of images.
    Unless control_tokens, message text stays text: `<|end|>` or `<|image_1|>` in it are not tokens or tags."""
    out, n_images = [], 0
    mark = (lambda t: t) if control_tokens else literal
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            out.append({"role": role, "content": mark(m.content) if m.content else ""})
            continue
        texts = [mark(p.text) for p in m.content if p.type == "text"]
        urls = [p.image_url.url for p in m.content if p.type == "image_url"]
        if urls and role != "user":
            raise APIError(400, f"messages[{i}]: only user messages can carry images", f"messages[{i}].content")
        out.append({"role": role, "content": "\n".join(texts), **({"images": urls} if urls else {})})
        n_images += len(urls)
    return out, n_images


def _image_bytes(url: str, allow_dirs: tuple[Path, ...], index: int) -> tuple[bytes, str]:
    """The encoded bytes of an image_url and a name for messages (never a server path): data: URLs, and file://
    inside allow_dirs (symlinks are followed, and refused if they lead outside)."""
    if url.startswith("data:"):
        try:
            return decode_data_url(url), f"image {index} (data URL)"
        except InputError as e:
            raise APIError(400, f"image {index}: {e}", "messages") from e
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        raise APIError(400, f"image URLs over {scheme} are not fetched (this server may have no network): send the "
                            "image inline as a base64 'data:image/...;base64,...' URL", "messages", "image_url_refused")
    if scheme != "file":
        raise APIError(400, f"unsupported image URL {quote(url)}: send a base64 data: URL or a file:// URL",
                       "messages")
    asked = unquote(urlparse(url).path)
    try:
        path = Path(asked).resolve()
        inside = any(path.is_relative_to(Path(d).resolve()) for d in allow_dirs)
        found = inside and path.is_file()
    except (OSError, ValueError):  # NUL bytes, loops, names too long
        inside = found = False
    if not inside:
        hint = "" if allow_dirs else ": this server reads no files (start it with --allow-dir DIR)"
        raise APIError(400, f"file URL {quote(asked)} is outside the folders this server may read{hint}",
                       "messages", "image_url_refused")
    if not found:
        raise APIError(400, f"image file not found: {quote(asked)}", "messages")
    return path.read_bytes(), f"image {index} (file URL)"


@dataclass
class SizedImage:
    """An image's encoded bytes and its size from the header: what a request costs, before any pixel is decoded."""

    data: bytes
    name: str
    width: int
    height: int


def read_image_header(url: str, allow_dirs: tuple[Path, ...], max_pixels: int, index: int) -> SizedImage:
    """Bytes and header size of an image_url; 413 over max_pixels, 400 if it is not an image (PIL reads the header
    only: no pixel is decoded here)."""
    from PIL import Image

    data, name = _image_bytes(url, allow_dirs, index)
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise APIError(413, f"{name} is too large to decode ({e})", "messages", "image_too_large") from e
    except Exception as e:  # PIL raises many kinds on hostile headers
        raise APIError(400, f"{name} is not an image this server can read ({type(e).__name__})", "messages",
                       "invalid_image") from e
    if min(width, height) < 1:
        raise APIError(400, f"{name} is empty ({width}x{height})", "messages", "invalid_image")
    if width * height > max_pixels:
        raise APIError(413, f"{name} is {width}x{height} = {width * height} pixels, over this server's limit of "
                            f"{max_pixels}; downscale it", "messages", "image_too_large")
    return SizedImage(data, name, width, height)


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


def finite(logprob: float) -> float:
    """A log-probability JSON can carry: -inf (a token that cannot be drawn) and NaN become MIN_LOGPROB."""
    return logprob if logprob > MIN_LOGPROB else MIN_LOGPROB


def chat_logprob(label, token: int, logprob: float, top: list | None) -> dict:
    """One entry of a chat choice's logprobs.content; label: token id -> (text, UTF-8 bytes)."""
    def entry(t, lp):
        text, raw = label(t)
        return {"token": text, "logprob": finite(lp), "bytes": list(raw)}

    return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top or []]}


def completion_logprobs(label, items: list[tuple], offset: int) -> dict:
    """/v1/completions logprobs of [(token, logprob, [(token, logprob), ...]), ...]; offset: where the text starts."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp, top in items:
        text = label(token)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(finite(lp))
        out["top_logprobs"].append({label(t)[0]: finite(v) for t, v in top or []})
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
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"

"""An OpenAI-compatible HTTP server (and a web chat page) on the continuous-batching Engine.

The engine runs on its own thread (worker.py); tokens come back to the asyncio side with
`loop.call_soon_threadsafe` into per-request asyncio queues. Text prompts are prepared on one more thread, and
requests with images on another (decoding, the vision tower), so decoding never waits for them and a text request
never waits behind images. An image's token cost is read from its header, so a request over the context is refused
before any pixel is decoded. One request's failure while generating ends that request only.
"""

# no `from __future__ import annotations`: FastAPI reads the route handlers' annotations (Request) at run time
import asyncio
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..inference.engine import Engine
from ..inference.requests import Prompt
from ..processing.image import DEFAULT_MAX_PIXELS, load_image
from .checks import check_image_cost, loads
from .limits import Guard, header_timeout_protocol
from .protocol import APIError, ChatRequest, CompletionRequest, Reply, chat_messages, quote, token_labels
from .schema import RESPONSES, openapi_schema
from .worker import EngineFailure, Job, QueueFull, Worker

STATIC = Path(__file__).resolve().parent / "static"
API_KEY_ENV = "PHI3V_API_KEY"
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


@dataclass
class Settings:
    """What the operator sets with `phi3v serve` flags."""

    max_batch: int = 8
    max_context: int = 4096
    api_key: str | None = None
    allow_dirs: tuple[Path, ...] = ()  # file:// image URLs are served from these folders only
    max_queue: int = 64  # engine requests waiting for a slot; more answer 429
    max_images: int | None = None  # per request; None: as many of the cheapest images as fit max_context
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_tokens_limit: int = 4096
    model_name: str | None = None  # default: the checkpoint folder's name
    shutdown_grace_s: float = 5.0  # in-flight requests get this long to finish at shutdown
    max_body_bytes: int = 64 << 20  # larger request bodies (base64 images included) answer 413, chunked or not
    allow_control_tokens: bool = False  # message text may write control tokens (<|end|>) and <|image_N|> tags
    body_timeout_s: float = 30.0  # a request body that sends nothing for this long answers 408
    header_timeout_s: float = 10.0  # a connection that has not sent a whole request head by then is closed
    keep_alive_s: float = 5.0  # idle keep-alive connections are closed after this long


# --------------------------------------------------------------------------- the app

class Service:
    """Everything one app serves with: the model, its engine and worker, the prepare thread, counters."""

    def __init__(self, model, settings: Settings):
        self.model, self.settings = model, settings
        self.name = settings.model_name or Path(model.path).name
        self.engine = Engine(model.model, settings.max_batch, settings.max_context,
                             recompute_on_long_switch=model.recompute_on_long_switch, isolate_failures=True)
        self.worker = Worker(model, self.engine, settings.max_queue)
        self.prep = ThreadPoolExecutor(1, thread_name_prefix="phi3v-prepare")  # text: tokenizing, image headers
        self.vision = ThreadPoolExecutor(1, thread_name_prefix="phi3v-vision")  # image decoding, CLIP: one at a time
        self.max_images = settings.max_images if settings.max_images is not None else self._images_that_fit()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.counts: Counter = Counter()  # (route, status) -> responses
        self.prompt_tokens = 0
        self._json_vocab = None
        labels = token_labels(model.tokenizer)
        self.label = lambda t: labels[t] if 0 <= t < len(labels) else ("", b"")

    def json_vocab(self):
        if self._json_vocab is None:
            from ..inference.json_mode import JsonVocab

            self._json_vocab = JsonVocab(self.model.tokenizer, self.model.config.vocab_size)
        return self._json_vocab

    def _images_that_fit(self) -> int:
        """How many of the cheapest images (by token count) fit the context with a token to spare; 0: text model."""
        p = self.model.processor
        if p is None:
            return 0
        side = p.crop_size
        cheapest = min(p.num_tokens_for_size(side * r, side) for r in range(1, p.num_crops + 1))
        return max(1, (self.engine.max_context - 1) // cheapest)

    async def run(self, fn, *args, pool=None):
        """fn(*args) on the prepare thread (or `pool`); phi3v input errors become 400s."""
        try:
            return await self.loop.run_in_executor(pool or self.prep, fn, *args)
        except InputError as e:
            raise APIError(400, str(e), "messages" if "image" in str(e) else None) from e

    def check(self, body) -> None:
        """What can be refused before any work: an unknown model, too many tokens asked for."""
        if body.model not in (self.name, str(self.model.path)):
            raise APIError(404, f"model {quote(body.model)} is not served here; this server serves {self.name!r} "
                                "(see GET /v1/models)", "model", "model_not_found")
        asked, limit = body.requested_tokens(), self.settings.max_tokens_limit
        if asked is not None and asked > limit:
            raise APIError(400, f"max_tokens={asked} is over this server's limit of {limit}", "max_tokens")

    def job(self, prompt: Prompt, body, logprobs: int | None, json_mode: bool, sink) -> Job:
        budget = min(body.requested_tokens() or self.settings.max_tokens_limit,
                     self.engine.max_context - len(prompt.ids))
        params = body.sampling_params(budget)
        procs = [[self.json_vocab().processor(budget)] if json_mode else [] for _ in params]
        stop_ids = frozenset() if body.ignore_eos else self.model.tokenizer.stop_token_ids
        return Job(prompt, params, stop_ids, procs, logprobs, sink)

    def submit(self, prompt: Prompt, body, logprobs: int | None, json_mode: bool):
        """Hand a job to the engine thread (429 when the queue is full); returns its ticket and its asyncio queue."""
        if not prompt.ids:
            raise APIError(400, "the prompt is empty: give at least one token of text", "prompt")
        q: asyncio.Queue = asyncio.Queue()
        loop = self.loop

        def sink(item):  # called on the engine thread
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        try:
            ticket = self.worker.submit(self.job(prompt, body, logprobs, json_mode, sink))
        except QueueFull:
            raise APIError(429, f"the server is busy: {self.settings.max_queue} requests are already waiting; "
                                "retry later", None, "queue_full") from None
        self.prompt_tokens += len(prompt.ids)
        return ticket, q

    async def batches(self, ticket: int, q: asyncio.Queue, n: int, request):
        """Lists of Out as the engine thread sends them, until n choices have finished; the job is cancelled
        at once if the client disconnects or the consumer stops early."""
        gone = asyncio.ensure_future(_disconnected(request))
        get = None
        left = n
        try:
            while left:
                get = asyncio.ensure_future(q.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client left
                    return
                item, get = get.result(), None
                if isinstance(item, EngineFailure):
                    raise APIError(500, f"the engine failed while generating ({item})", code="engine_failed")
                if isinstance(item, Exception):  # this request alone failed (see Engine.failures)
                    raise APIError(500, f"generating this request failed ({type(item).__name__}: {item}); other "
                                        "requests are not affected", code="generation_failed") from item
                left -= sum(o.finish_reason is not None for o in item)
                yield item
        finally:  # also when the consumer is cancelled mid-wait (a dropped stream): no task is left pending
            for task in (get, gone):
                if task is not None and not task.done():
                    task.cancel()
            if left:
                self.worker.cancel(ticket)

    async def respond(self, request, body, prompt: Prompt, kind: str, logprobs: int | None, json_mode=False):
        """The response to a checked request: the whole object, or a stream of server-sent events."""
        from fastapi.responses import StreamingResponse

        ticket, q = self.submit(prompt, body, logprobs, json_mode)
        reply = Reply(kind, self.name, self.label, body.n, len(prompt.ids), logprobs is not None)
        batches = self.batches(ticket, q, body.n, request)
        if not body.stream:
            return await reply.complete(batches)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(reply.stream(batches, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(model, settings: Settings | None = None):
    """The FastAPI app serving `model` (a loaded phi3v.api.Phi3Model) with `settings`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    settings = settings or Settings()
    svc = Service(model, settings)

    @asynccontextmanager
    async def lifespan(app):
        svc.loop = asyncio.get_running_loop()
        svc.worker.start()
        yield
        # uvicorn has stopped accepting and given open requests shutdown_grace_s to finish: cancel what is left
        svc.worker.stop()
        svc.prep.shutdown(wait=False)
        svc.vision.shutdown(wait=False)

    app = FastAPI(title="phi3v", lifespan=lifespan)
    app.state.service = svc

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    app.add_exception_handler(APIError, lambda req, e: error(e))
    app.add_exception_handler(HTTPException, lambda req, e: error(APIError(
        e.status_code, f"no route {req.method} {quote(req.url.path)}" if e.status_code in (404, 405)
        else str(e.detail), code="not_found" if e.status_code == 404 else None)))
    app.add_exception_handler(RequestValidationError, lambda req, e: error(APIError(400, "invalid request")))
    app.add_exception_handler(Exception, lambda req, e: error(APIError(500, f"internal error: {type(e).__name__}")))

    async def parse(request: Request, schema):
        data = loads(await request.body())
        try:
            body = schema.model_validate(data)
        except ValidationError as e:
            first = e.errors(include_input=False, include_url=False)[0]
            param = ".".join(str(x) for x in first["loc"])[:200]
            raise APIError(400, f"invalid request: {param}: {first['msg']} ({e.error_count()} error(s))", param) \
                from e
        svc.check(body)
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": svc.name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": svc.name, "object": "model", "created": 0, "owned_by": "phi3v",
                                            "max_model_len": svc.engine.max_context}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        st, w = svc.engine.stats, svc.worker
        lines = [
            ("phi3v_queue_length", "gauge", "Requests waiting for a cache slot.", w.waiting + w.in_inbox),
            ("phi3v_running_requests", "gauge", "Requests holding a cache slot.", w.running),
            ("phi3v_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", svc.prompt_tokens),
            ("phi3v_generation_tokens_total", "counter", "Tokens generated.", w.generated),
            ("phi3v_prefill_tokens_per_second", "gauge", "Prefill throughput while prefilling.",
             st.prefill_tokens / st.prefill_s if st.prefill_s else 0.0),
            ("phi3v_decode_tokens_per_second", "gauge", "Decode throughput while decoding.",
             st.decode_tokens / st.decode_s if st.decode_s else 0.0),
        ]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in lines)
        text += "# HELP phi3v_requests_total Responses by route and status code.\n# TYPE phi3v_requests_total counter\n"
        text += "".join(f'phi3v_requests_total{{route="{r}",code="{c}"}} {k}\n'
                        for (r, c), k in sorted(svc.counts.items()))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.post("/v1/chat/completions", responses=RESPONSES)
    async def chat(request: Request):
        body = await parse(request, ChatRequest)
        body.check_unsupported()
        messages, n_images = chat_messages(body.messages, settings.allow_control_tokens)
        if n_images and not model.is_vision:
            raise APIError(400, f"{svc.name} is a text model: it cannot take images", "messages")
        if n_images > svc.max_images:
            raise APIError(400, f"{n_images} images in one request, over this server's limit of "
                                f"{svc.max_images}", "messages", "too_many_images")
        json_mode = body.response_format is not None and body.response_format.type == "json_object"
        if json_mode:
            await svc.run(svc.json_vocab)  # built once, off the event loop
        if n_images:  # sizes from the headers: a request over the context is refused before any pixel is decoded
            await svc.run(check_image_cost, model, messages, settings.allow_dirs, settings.max_image_pixels,
                          svc.engine.max_context)

        def prepare():
            for m in messages:
                if "images" in m:
                    m["images"] = [load_image(im.data, settings.max_image_pixels) for im in m["images"]]
            return model.prepare(messages, max_context=svc.engine.max_context)

        prompt = await svc.run(prepare, pool=svc.vision if n_images else svc.prep)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await svc.respond(request, body, prompt, "chat", logprobs, json_mode)

    @app.post("/v1/completions", responses=RESPONSES)
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        text = body.prompt
        if isinstance(text, list):
            if len(text) != 1:
                raise APIError(400, "send one prompt per request (prompt as a string)", "prompt")
            text = text[0]
        if body.echo or body.suffix:
            raise APIError(400, "echo and suffix are not supported", "echo" if body.echo else "suffix")
        prompt = await svc.run(lambda: model.prepare(text, raw=True, max_context=svc.engine.max_context))
        return await svc.respond(request, body, prompt, "completion", body.logprobs)

    app.openapi = lambda: openapi_schema(app, svc.name)
    app.add_middleware(Guard, service=svc, routes=ROUTES)
    return app


# --------------------------------------------------------------------------- running it

@contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0):
    """Serve `app` (from create_app) with uvicorn on a background thread; yields the base URL (port 0: a free
    port). On exit, open requests get the settings' shutdown_grace_s to finish, then are cancelled."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **uvicorn_options(app.state.service.settings)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server thread died while starting (see its log above)")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def uvicorn_options(settings: Settings) -> dict:
    """uvicorn's settings for this server: shutdown grace, keep-alive and request-head timeouts."""
    return dict(timeout_graceful_shutdown=settings.shutdown_grace_s, timeout_keep_alive=settings.keep_alive_s,
                http=header_timeout_protocol(settings.header_timeout_s))

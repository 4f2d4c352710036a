"""`phi3v serve`: the OpenAI-compatible server and its web chat page."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from ..serve.app import API_KEY_ENV, Settings, create_app, uvicorn_options
from .common import add_model_args, load_model

HELP = "OpenAI-compatible HTTP server and web chat page"


def add_arguments(p) -> None:
    d = Settings()
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="requests decoded together (cache slots)")
    p.add_argument("--max-context", type=int, default=d.max_context, help="tokens per slot: prompt + answer")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    p.add_argument("--allow-dir", action="append", help="folder file:// image URLs may read from (repeatable)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before answering 429")
    p.add_argument("--max-images", type=int, default=d.max_images,
                   help="images per request (default: as many as fit --max-context)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="pixels per image")
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit, help="largest max_tokens accepted")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (chunked too)")
    p.add_argument("--allow-control-tokens", action="store_true",
                   help="let message text write control tokens (<|end|>, <|assistant|>) and <|image_N|> tags")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help="seconds a request body may stall before 408")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help="seconds a connection has to send a whole request head")
    p.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_s,
                   help="seconds an idle keep-alive connection stays open")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    import uvicorn

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not api_key and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use the "
              f"model. Pass --api-key or set {API_KEY_ENV}.", file=sys.stderr)
    model = load_model(args)
    settings = Settings(max_batch=args.max_batch, max_context=args.max_context, api_key=api_key,
                        allow_dirs=tuple(Path(d).resolve() for d in args.allow_dir or []), max_queue=args.max_queue,
                        max_images=args.max_images, max_image_pixels=args.max_image_pixels,
                        max_tokens_limit=args.max_tokens_limit, model_name=args.served_model_name,
                        max_body_bytes=args.max_body_bytes, allow_control_tokens=args.allow_control_tokens,
                        body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
                        keep_alive_s=args.keep_alive_timeout)
    app = create_app(model, settings)
    print(f"serving {app.state.service.name} on http://{args.host}:{args.port} (chat page at /, API at /v1)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", **uvicorn_options(settings))
    return 0

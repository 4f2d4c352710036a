"""What guards the server before a route runs: the API key, the body size counted as the bytes arrive (chunked or
not), a deadline for each piece of the body, response counts; and connections that never finish their headers."""

from __future__ import annotations

import asyncio
import hmac
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError

PUBLIC = ("/health", "/")  # the chat page is static: it asks for the key itself and sends it with each call


def authorize(headers: dict, api_key: str | None) -> None:
    """401 unless `Authorization: Bearer <api_key>` (constant-time compare); nothing to check without a key."""
    if not api_key:
        return
    header = headers.get(b"authorization", b"").decode("latin-1")
    if not header.lower().startswith("bearer "):
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
    if not hmac.compare_digest(header[7:].strip().encode("latin-1"), api_key.encode()):
        raise APIError(401, "invalid API key", code="invalid_api_key")


class Guard:
    """ASGI middleware: refuses requests without the API key (401), bodies over max_body_bytes (413, as soon as
    the bytes say so: the rest is never read) and bodies that stall for body_timeout_s (408); counts responses by
    route and status."""

    def __init__(self, app, service, routes: tuple[str, ...]):
        self.app, self.svc, self.routes = app, service, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.svc.settings
        route = scope["path"] if scope["path"] in self.routes else "other"
        started = False

        async def counted(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.svc.counts[(route, message["status"])] += 1
            await send(message)

        headers = dict(scope["headers"])
        size = headers.get(b"content-length")
        limit = settings.max_body_bytes
        try:
            if scope["path"] not in PUBLIC:
                authorize(headers, settings.api_key)
            if size is not None and size.isdigit() and int(size) > limit:
                raise _too_large(limit)
        except APIError as e:
            return await _answer(counted, e)
        received, body_done = 0, False

        async def limited():
            nonlocal received, body_done
            if body_done:  # later calls wait for the client to leave, for as long as the answer takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), settings.body_timeout_s)
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body stalled for {settings.body_timeout_s:g} s; send it whole",
                               code="request_timeout") from None
            received += len(message.get("body", b""))
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if received > limit:
                raise _too_large(limit)
            return message

        try:
            await self.app(scope, limited, counted)
        except APIError as e:  # raised by `limited` outside a route (FastAPI answers those inside routes itself)
            if not started:
                await _answer(counted, e)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over this server's limit of {limit} bytes", code="request_too_large")


async def _answer(send, e: APIError) -> None:
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": json.dumps(e.body()).encode()})


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing connections that have not sent a whole request head within timeout_s
    (uvicorn's own keep-alive timeout stops counting as soon as any byte arrives: a half-open client lives forever)."""

    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _waiting_for_head(self) -> bool:
            import h11

            return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

        def _arm(self) -> None:
            if not self._waiting_for_head():
                self._disarm()
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if self._waiting_for_head() and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol

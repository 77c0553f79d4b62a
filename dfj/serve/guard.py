"""The ASGI layers in front of the routes, in order: metrics of every answer, then the checks that
refuse a request before it costs anything (nothing of its body is read):

- Host: on a loopback address the Host header must name this machine (a web page that rebinds its DNS
  name to 127.0.0.1 cannot read answers);
- the API key (when one is set), compared in constant time; `/health` is open to every caller;
- admission: more than `max_active` requests held at once are answered 503 with Retry-After;
- POST bodies must be JSON (a browser cannot send that cross-origin without a CORS preflight, which
  this service never answers), and at most `max_body` bytes: a larger Content-Length is answered 413
  unread, and a chunked body is cut off at the cap.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any, Awaitable, Callable

from dfj.serve.metrics import Metrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/health", "/openapi.json")
# A body over the cap is read and thrown away, up to this many bytes, for as long as the client keeps
# sending (an idle second ends it, and a total limit), before the 413 is sent: a client that writes its
# whole body before reading (urllib, requests) then reads the 413, where a close while it writes gives it
# a broken pipe. Past the bound the connection is closed.
DRAIN_BYTES = 64 << 20
DRAIN_IDLE_S = 1.0
DRAIN_SECONDS = 30.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


async def send_error(send: Send, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
    """An error in the OpenAI shape (`{"error": {"message", "type", "code"}}`), which its clients parse."""
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Observe:
    """Counts every answer by route and status, and its latency; tracks requests held."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self.metrics.route(scope["path"])
        started = time.monotonic()
        status = [499]  # no answer sent: the client left first

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - started)


class Guard:
    def __init__(self, app: ASGIApp, metrics: Metrics, *, api_key: bytes | None, max_active: int, max_body: int,
                 loopback: bool, retry_after: Callable[[], int], methods: dict[str, set[str]] | None = None) -> None:
        self.app, self.metrics = app, metrics
        self.methods = methods or {}  # path -> the methods its route takes: another one is answered 405
        self.api_key, self.max_active, self.max_body, self.loopback = api_key, max_active, max_body, loopback
        self.retry_after = retry_after
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.loopback and not _loopback_host(headers.get("host", "")):
            return await send_error(send, 421, "this service answers requests addressed to localhost only",
                                    "invalid_request_error")
        # Before the key: which methods a route takes is in the open document anyway.
        allowed = self.methods.get(scope["path"])
        if allowed is not None and scope["method"] not in allowed | ({"HEAD"} if "GET" in allowed else set()):
            return await send_error(send, 405, f"{scope['path']} takes {', '.join(sorted(allowed))}, not {scope['method']}",
                                    "invalid_request_error", {"allow": ", ".join(sorted(allowed))})
        if scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.api_key is not None and not self._authorized(headers):
            self.metrics.rejected.labels("unauthorized").inc()
            return await send_error(send, 401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                    "authentication_error", {"www-authenticate": "Bearer"})
        if scope["method"] == "POST":
            refusal = self._check_body(headers)
            if refusal is not None:
                status, message, reason = refusal
                if reason:
                    self.metrics.rejected.labels(reason).inc()
                if status == 413:
                    await _drain(receive)
                return await send_error(send, status, message, "invalid_request_error", {"connection": "close"})
        if scope["method"] != "POST":  # reads (info, metrics) hold no body and no judge: a full service answers them
            return await self.app(scope, receive, send)
        if self.active >= self.max_active:
            self.metrics.rejected.labels("busy").inc()
            return await send_error(send, 503, f"the service holds {self.active} requests, its limit; retry later",
                                    "server_busy", {"retry-after": str(self.retry_after())})
        self.active += 1
        self.metrics.active.set(self.active)
        try:
            await self._bounded(scope, receive, send)
        finally:
            self.active -= 1
            self.metrics.active.set(self.active)

    def _authorized(self, headers: dict[str, str]) -> bool:
        given = headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self.api_key)

    def _check_body(self, headers: dict[str, str]) -> tuple[int, str, str] | None:
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return 415, f"the body must be JSON (Content-Type: application/json), not {kind or 'untyped'}", ""
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "Content-Length is not a number", ""
            if int(length) > self.max_body:
                return 413, _too_large(int(length), self.max_body), "body_too_large"
        return None

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Runs the app, cutting off a body that grows past the cap (chunked uploads declare no length):
        the app then sees a disconnect, and the client gets 413."""
        received = 0
        over = False
        started = False

        async def counted() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over:
                return  # the 413 below is the answer
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            self.metrics.rejected.labels("body_too_large").inc()
            await _drain(receive)
            await send_error(send, 413, _too_large(received, self.max_body), "invalid_request_error", {"connection": "close"})


async def _drain(receive: Receive) -> None:
    """Read and discard what the client still sends, up to DRAIN_BYTES, while it keeps sending."""
    import asyncio

    drained = 0
    deadline = time.monotonic() + DRAIN_SECONDS
    while drained < DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, min(DRAIN_IDLE_S, deadline - time.monotonic())))
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body"):
            return


def _too_large(size: int, cap: int) -> str:
    return f"the body is over this service's limit of {cap / (1 << 20):g} MB ({size} bytes or more); not judged"


def _loopback_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.lower() in LOOPBACK_NAMES

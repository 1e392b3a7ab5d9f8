"""Pure ASGI middleware: request metrics, the request-body size and time limits, unexpected
errors.

Pure ASGI (not ``BaseHTTPMiddleware``) so streaming responses pass through untouched and
a client disconnect still reaches the route.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_type
from .metrics import Metrics
from .protocol.errors import error_body

logger = logging.getLogger(__name__)


class RequestMetricsMiddleware:
    """Count requests by route template (not raw path: bounded label values) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(route=label, status=str(status["code"])).inc()


class FramingMiddleware:
    """Forbid framing by other sites on every response (clickjacking: the playground takes
    keys): ``X-Frame-Options: SAMEORIGIN`` and, unless the route set its own policy, the
    Content-Security-Policy ``frame-ancestors 'self'``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def framed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {key.lower() for key, _ in headers}
                headers.append((b"x-frame-options", b"SAMEORIGIN"))
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", b"frame-ancestors 'self'"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, framed_send)


class UnexpectedErrorMiddleware:
    """Answer an unhandled exception with a complete JSON 500 and keep the connection.

    Starlette's own last-resort handler re-raises after answering, and uvicorn then drops
    the kept-alive connection without ``Connection: close``, so a pooled client's next
    request fails. Here the exception ends with the response. Once a response has started
    (a stream) nothing complete can be sent: the exception goes on and the connection
    closes, which tells the client the response is cut.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            body = error_body("internal server error", "server_error", code="internal_error")
            await send_json(send, 500, body)


class BodyLimitMiddleware:
    """Answer 413 when a request body passes ``max_bytes`` (declared or actually sent)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, refusal: Callable[[Scope], Any] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.refusal = refusal  # scope -> the route's auth error (an APIError) or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(scope, send, declared)
            return
        received = 0
        too_large = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True  # the app sees a disconnect and gives up reading
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not too_large:  # once over the limit, the app's own answer is dropped
                await send(message)

        await self.app(scope, limited_receive, guarded_send)
        if too_large:
            await self._reject(scope, send, received)

    async def _reject(self, scope: Scope, send: Send, size: int) -> None:
        refusal = self.refusal(scope) if self.refusal is not None else None
        if refusal is not None:  # no token: that comes first, whatever the body's size
            body = error_body(refusal.message, error_type(refusal.status), code=refusal.code)
            await send_json(send, refusal.status, body, refusal.headers)
            return
        message = (
            f"request body of {size} bytes or more exceeds the limit of {self.max_bytes} bytes"
        )
        body = error_body(message, "invalid_request_error", code="request_too_large")
        await send_json(send, 413, body)


class BodyTimeoutMiddleware:
    """Answer 408 and close the connection when a request body takes over ``timeout_s``.

    A client that announces a body and sends it slowly (or never) would otherwise hold a
    connection, and the task serving it, for as long as it likes. The clock runs from the
    request's start until its last body chunk; reads after that (routes waiting for a
    disconnect) are not timed.
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False
        timed_out = False
        started = False

        async def timed_receive() -> Message:
            nonlocal body_done, timed_out
            if body_done:
                return await receive()
            if timed_out:
                return {"type": "http.disconnect"}
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.0))
            except TimeoutError:
                timed_out = True  # the app sees a disconnect and gives up reading
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if timed_out and not started:  # the app's answer to a cut body is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, timed_receive, guarded_send)
        if timed_out and not started:
            message = f"the request body did not arrive within {self.timeout_s:g} s"
            body = error_body(message, "invalid_request_error", code="request_timeout")
            await send_json(send, 408, body, {"Connection": "close"})


async def send_json(
    send: Send, status: int, body: dict[str, Any], extra: dict[str, str] | None = None
) -> None:
    """A complete JSON response, written straight to the ASGI channel."""
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in (extra or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _content_length(scope: Scope) -> int | None:
    headers: Any = scope.get("headers") or []
    for key, value in headers:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

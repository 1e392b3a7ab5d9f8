"""Server-sent events: encoding and the response class shared by TGI and OpenAI routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mpo_core.errors import GenerationFailed, MPOError

from .errors import error_type
from .protocol.errors import error_body

logger = logging.getLogger(__name__)


def sse(data: Any) -> str:
    """One ``data:`` event; dicts and lists are JSON-encoded, strings sent as they are."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


def sse_error(exc: BaseException) -> str:
    """A failure after the 200 was sent becomes a last event in the error shape."""
    status = 503 if isinstance(exc, MPOError) and not isinstance(exc, GenerationFailed) else 500
    message = str(exc) if isinstance(exc, MPOError) else "internal server error"
    return sse(error_body(message, error_type(status)))


KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic


async def with_keepalive(events: AsyncIterator[str], interval_s: float) -> AsyncIterator[str]:
    """Pass the events on; when none comes for ``interval_s``, send a keep-alive comment.

    The pending read is never cancelled by the timeout (that would break the generator):
    it is waited on again after each comment.
    """
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield KEEPALIVE
                continue
            finished, pending = pending, None
            try:
                chunk = finished.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Turn an exception in mid-stream into an error event instead of a cut connection."""
    try:
        async for chunk in events:
            yield chunk
    except Exception as exc:
        logger.warning("stream failed: %r", exc)
        yield sse_error(exc)


class SSEResponse(StreamingResponse):
    """Starlette cancels the body iterator when the client disconnects; ``on_close`` then
    cancels the engine sequences, even if the iterator had not started yet."""

    media_type = "text/event-stream"  # what the OpenAPI document shows for such routes

    def __init__(
        self,
        events: AsyncIterator[str],
        headers: dict[str, str],
        on_close: Callable[[], None],
        keepalive_s: float,
    ) -> None:
        all_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers}
        body = with_keepalive(guarded(events), keepalive_s)
        super().__init__(body, media_type="text/event-stream", headers=all_headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()

"""Graceful shutdown: drain on SIGTERM, then let uvicorn close.

On the first SIGTERM (or SIGINT) ``DrainingServer`` keeps listening and marks the app as
draining: from then on ``DrainMiddleware`` answers every new request 503 with
``Retry-After`` and ``Connection: close`` (a load balancer retries it elsewhere; the
readiness probe fails). Active fit jobs are cancelled. Requests already running may
finish for up to ``drain_timeout_s``; past it the engine cancels what is left, so each
open stream ends with an error event (and each waiting non-streaming request with a
503) instead of a cut connection. Then uvicorn's own shutdown runs: it closes the
listeners and the idle connections, and the lifespan stops the engine. A second signal
skips the drain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_type, retry_after_header
from .jobs import FitJobs
from .middleware import send_json
from .protocol.errors import error_body

logger = logging.getLogger(__name__)

END_STREAMS_GRACE_S = 5.0  # after cancelling, how long streams get to send their last event


class Drain:
    """Requests in flight, and whether new ones are still admitted (event-loop only)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight; False when ``timeout`` passes first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(timeout, 0.0))
        except TimeoutError:
            return self.in_flight == 0
        return True


class DrainMiddleware:
    """Count requests in flight; while draining, answer new ones 503 at once."""

    def __init__(self, app: ASGIApp, drain: Drain, retry_after_s: float) -> None:
        self.app = app
        self.drain = drain
        self.retry_after = retry_after_header(retry_after_s)["Retry-After"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await self._refuse(send)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()

    async def _refuse(self, send: Send) -> None:
        body = error_body(
            "the server is shutting down; retry on another replica",
            error_type(503),
            code="shutting_down",
        )
        headers = {"Retry-After": self.retry_after, "Connection": "close"}
        await send_json(send, 503, body, headers)


async def drain_app(app: FastAPI, timeout_s: float) -> None:
    """Stop admitting, cancel fit jobs, wait for running requests, end what is left."""
    drain: Drain = app.state.drain
    drain.draining = True
    started = time.monotonic()
    logger.info(
        "draining: %d request(s) in flight may finish within %.1f s; new ones get 503",
        drain.in_flight,
        timeout_s,
    )
    fit_jobs: FitJobs | None = getattr(app.state, "fit_jobs", None)
    cancelled_fits = fit_jobs.cancel_all() if fit_jobs is not None else []
    if await drain.wait_idle(timeout_s):
        logger.info("drained: every request finished")
    else:
        await _end_what_is_left(app, drain, timeout_s)
    if fit_jobs is not None:
        left = max(timeout_s - (time.monotonic() - started), 0.0) + END_STREAMS_GRACE_S
        for job in cancelled_fits:  # a fit outlives any drain; cancelled, it stores nothing
            final = await asyncio.to_thread(fit_jobs.wait, job, left)
            logger.info("fit job %s is %s", job.id, final.state.value)


async def _end_what_is_left(app: FastAPI, drain: Drain, timeout_s: float) -> None:
    """Past the drain timeout: cancel every sequence, so each open stream sends its error
    event and each waiting request its 503; give them a moment to be written."""
    serving = getattr(app.state, "serving", None)
    cancelled = serving.engine.cancel_all() if serving is not None else 0
    logger.warning(
        "drain timeout (%.1f s): %d request(s) still in flight; %d sequence(s) cancelled, "
        "their streams end with an error event",
        timeout_s,
        drain.in_flight,
        cancelled,
    )
    if not await drain.wait_idle(END_STREAMS_GRACE_S):
        logger.warning("%d request(s) did not end; uvicorn closes them", drain.in_flight)


class DrainingServer(uvicorn.Server):
    """uvicorn whose first exit signal drains the app (``drain_app``) before shutting down."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self.drain_task: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_task is not None or not self.started or self._loop is None:
            super().handle_exit(sig, frame)  # a second signal, or still starting: now
            return
        # A signal handler may only hand work to the loop through its thread-safe door.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self.drain_task is None:
            self.drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await drain_app(self.app, self.drain_timeout_s)
        except Exception:
            logger.exception("draining failed; shutting down now")
        finally:
            self.should_exit = True

"""Token events and the stream that carries them from the engine thread to a caller.

The engine thread pushes; the caller consumes either by blocking iteration (scripts,
tests, the fit driver) or by ``async for`` (the HTTP server), with no thread per request.
An event leaves the engine with its token and log-probs; its text is filled in as the
caller reads it (``reader``: ``detokenize.ReplyReader``), outside the engine thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class TokenEvent:
    """One generated token, as the mixture saw it."""

    index: int  # position among the generated tokens, from 0
    token_id: int
    token_text: str  # the token decoded alone (filled in by the stream's reader)
    text: str  # new text to append to the reply (stop strings removed, may be ""; the reader's)
    logprob: float  # under the mixed distribution at temperature 1
    top_logprobs: list[tuple[int, float]]  # the mixture's best alternatives
    policy_logprobs: dict[str, float | None]  # each policy's own log-prob; None if not run
    special: bool  # a special token (EOS, ...)
    finish_reason: str | None = None  # set on the last event only
    token_bytes: bytes = b""  # the token's exact bytes (``token_bytes``); joined: the reply
    token_piece: str = ""  # the characters this token's bytes complete; joined: the reply
    stop_token: bool = False  # it ended the reply as EOS or a stop token id (not text)


@dataclass
class GenerationResult:
    """Everything a finished request produced (``Engine.generate``)."""

    token_ids: list[int]
    text: str
    finish_reason: str
    seed: int
    weights: dict[str, float]
    prompt_tokens: int
    events: list[TokenEvent] = field(default_factory=list)

    @classmethod
    def collect(cls, stream: RequestStream) -> GenerationResult:
        """Read ``stream`` to its end (blocking)."""
        events = list(stream)
        return cls(
            token_ids=[e.token_id for e in events],
            text="".join(e.text for e in events),
            finish_reason=events[-1].finish_reason or "length",
            seed=stream.seed,
            weights=stream.weights,
            prompt_tokens=stream.prompt_tokens,
            events=events,
        )


class RequestStream:
    """The caller's handle on one request: iterate its events, or cancel it."""

    def __init__(
        self,
        request_id: str,
        weights: dict[str, float],
        strength: float,
        prompt_tokens: int,
        seed: int,
        on_cancel: Callable[[], None],
        reader: Callable[[TokenEvent], TokenEvent] | None = None,
    ) -> None:
        self.request_id = request_id
        self.weights = weights  # normalised, as used
        self.strength = strength
        self.prompt_tokens = prompt_tokens
        self.seed = seed
        # Speculative decoding: tokens drafted for this reply, and of those kept (the
        # engine updates both before it pushes the events of a step).
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self._on_cancel = on_cancel
        self._reader = reader  # runs on the caller's thread, outside the lock
        self._items: collections.deque[TokenEvent | BaseException] = collections.deque()
        self._cond = threading.Condition()
        self._done = False
        self.cancelled = False
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._ready = asyncio.Event()

    # -- engine side ---------------------------------------------------------------
    def push(self, item: TokenEvent | BaseException) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
        if self._loop is not None:
            # a closed loop raises RuntimeError: its caller is gone, nobody is listening
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._ready.set)

    # -- caller side ---------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generating; the engine drops the sequence at its next step."""
        if not self._done and not self.cancelled:
            self.cancelled = True
            self._on_cancel()

    @property
    def finished(self) -> bool:
        return self._done

    def _finish(self, item: TokenEvent | BaseException) -> TokenEvent:
        """Read one item (off the lock: the engine thread never waits for a reader)."""
        if isinstance(item, BaseException):
            self._done = True
            raise item
        engine_finished = item.finish_reason is not None
        event = self._reader(item) if self._reader is not None else item
        if event.finish_reason is not None:
            if not engine_finished:  # a stop string: the engine is still decoding it
                self.cancel()
            self._done = True
        return event

    def __iter__(self) -> Iterator[TokenEvent]:
        while not self._done:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._items.popleft()
            yield self._finish(item)

    async def _anext(self) -> TokenEvent:
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    break
                self._ready.clear()
            await self._ready.wait()
        return self._finish(item)

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[TokenEvent]:
        while not self._done:
            yield await self._anext()

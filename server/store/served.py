"""``ServedProfiles``: the profiles requests use, read off the event loop, answered from
this replica's cache while the store is down.

While the store is up, every resolution reads it (in a worker thread, so the event loop
never waits on a database; the PostgreSQL backend answers from its LISTEN-backed cache)
and remembers the answer. While it is down (``GuardedStore``), a profile this replica has
read (the default profile's name included) is answered from that memory at once, as long
as it was confirmed by the store at most ``max_stale_s`` ago; anything else is a 503 at
once. The staleness bound is what docs/deploy.md states.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import anyio

from mpo_core.errors import UnknownProfile

from .base import ProfileVersion, StoreUnavailable
from .guard import GuardedStore

logger = logging.getLogger(__name__)

_DEFAULT = ("default",)  # cache key of the default profile's name


@dataclass(frozen=True)
class _Entry:
    value: Any  # a ProfileVersion, or the default's name (str | None)
    confirmed_at: float  # monotonic seconds of the read that returned it


class ServedProfiles:
    """Resolves profile names for requests; one per app."""

    def __init__(self, store: GuardedStore, max_stale_s: float, readers: int = 8) -> None:
        self.store = store
        self.max_stale_s = max_stale_s
        self._readers = readers
        self._limiter: anyio.CapacityLimiter | None = None  # made on the event loop
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, ...], _Entry] = {}
        self._generation = 0  # bumped by forget(): a read started before must not refill
        self.cache_answers = 0  # requests answered from the cache during an outage

    async def resolve(self, name: str | None) -> tuple[str, ProfileVersion] | None:
        """The profile ``name`` (None: the default; None back when there is none) as
        (name, version). UnknownProfile (404) or StoreUnavailable (503)."""
        if self.store.up:
            if self._limiter is None:
                self._limiter = anyio.CapacityLimiter(self._readers)
            try:
                return await anyio.to_thread.run_sync(self.read, name, limiter=self._limiter)
            except StoreUnavailable as exc:
                outage = exc
        else:
            outage = self.store.unavailable()
        return self._cached(name, outage)

    def read(self, name: str | None) -> tuple[str, ProfileVersion] | None:
        """``resolve`` from the store (blocking), remembering what it found."""
        generation = self._generation
        if name is None:
            name = self.store.get_default()
            self._remember(_DEFAULT, name, generation)
            if name is None:
                return None
        try:
            version = self.store.get(name)
        except UnknownProfile:
            self.forget(name)
            raise
        self._remember(("profile", name), version, generation)
        return name, version

    def forget(self, name: str | None = None) -> None:
        """Drop what is remembered of ``name`` (None: everything)."""
        with self._lock:
            self._generation += 1
            if name is None:
                self._entries.clear()
            else:
                self._entries.pop(("profile", name), None)

    def _remember(self, key: tuple[str, ...], value: Any, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self._entries[key] = _Entry(value, time.monotonic())

    def _fresh(self, key: tuple[str, ...]) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry.confirmed_at >= self.max_stale_s:
            return None
        return entry

    def _cached(
        self, name: str | None, outage: StoreUnavailable
    ) -> tuple[str, ProfileVersion] | None:
        what = "the default profile" if name is None else f"profile {name!r}"
        if name is None:
            default = self._fresh(_DEFAULT)
            if default is None:
                raise self._miss(what, outage)
            if default.value is None:
                self.cache_answers += 1
                return None
            name = str(default.value)
        entry = self._fresh(("profile", name))
        if entry is None:
            raise self._miss(what, outage)
        self.cache_answers += 1
        version: ProfileVersion = entry.value
        return name, version

    def _miss(self, what: str, outage: StoreUnavailable) -> StoreUnavailable:
        return StoreUnavailable(
            f"{what} cannot be read: {outage}; this replica has not read it from the store "
            f"in the last {self.max_stale_s:g} s, so it cannot answer it from its cache "
            "(explicit weights still work)"
        )

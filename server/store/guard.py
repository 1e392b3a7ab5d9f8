"""``GuardedStore``: any backend, failing fast while its database is unreachable.

The first call that finds the database unreachable (``StoreUnavailable``, after the
backend's connect or statement timeout) marks the store down; from then on every call
raises ``StoreUnavailable`` at once (HTTP 503, naming the outage) instead of waiting on
the timeouts again, and one probe thread pings the backend every ``probe_interval_s``
until it answers. ``state()`` is what ``/health`` reports; it never touches the database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .base import Family, ProfileStore, ProfileVersion, ProfileVersions, StoreUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")


class GuardedStore:
    """A ``ProfileStore`` in front of another, with the store's up/down state."""

    def __init__(self, backend: ProfileStore, probe_interval_s: float = 1.0) -> None:
        self.backend = backend
        self.family: Family = backend.family
        self._probe_interval_s = probe_interval_s
        self._lock = threading.Lock()
        self._down_since: float | None = None  # unix seconds; None while up
        self._error = ""
        self._closed = threading.Event()
        self._probe: threading.Thread | None = None
        self.outages = 0  # times the store went down (tests and logs)

    # -- state ---------------------------------------------------------------------
    @property
    def up(self) -> bool:
        return self._down_since is None

    def state(self) -> dict[str, Any]:
        """``{"state": "up"}`` or ``{"state": "down", "since": unix s, "error": ...}``."""
        with self._lock:
            if self._down_since is None:
                return {"state": "up"}
            return {"state": "down", "since": self._down_since, "error": self._error}

    def unavailable(self) -> StoreUnavailable:
        """The error a call gets while the store is down."""
        with self._lock:
            since, error = self._down_since, self._error
        age = 0.0 if since is None else max(0.0, time.time() - since)
        return StoreUnavailable(f"{error} (down for {age:.0f} s; retry shortly)")

    def _mark_down(self, exc: StoreUnavailable) -> None:
        with self._lock:
            self._error = str(exc)
            if self._down_since is not None or self._closed.is_set():
                return
            self._down_since = time.time()
            self.outages += 1
            self._probe = threading.Thread(target=self._probe_loop, name="mpo-store-probe")
            self._probe.daemon = True
            self._probe.start()
        logger.warning("profile store down: %s; probing every %.1f s", exc, self._probe_interval_s)

    def _probe_loop(self) -> None:
        while not self._closed.wait(self._probe_interval_s):
            try:
                self.backend.ping()
            except StoreUnavailable as exc:
                with self._lock:
                    self._error = str(exc)
                continue
            with self._lock:
                since, self._down_since = self._down_since, None
            logger.info("profile store back after %.1f s", time.time() - (since or time.time()))
            return

    def _call(self, method: Callable[..., T], *args: Any) -> T:
        if not self.up:
            raise self.unavailable()
        try:
            return method(*args)
        except StoreUnavailable as exc:
            self._mark_down(exc)
            raise

    # -- ProfileStore --------------------------------------------------------------
    def list(self) -> ProfileVersions:
        return self._call(self.backend.list)

    def get(self, name: str, version: int | None = None) -> ProfileVersion:
        return self._call(self.backend.get, name, version)

    def history(self, name: str) -> ProfileVersions:
        return self._call(self.backend.history, name)

    def put(
        self,
        name: str,
        weights: dict[str, float],
        strength: float = 1.0,
        meta: dict[str, Any] | None = None,
        personas: dict[str, Any] | None = None,
    ) -> ProfileVersion:
        return self._call(self.backend.put, name, weights, strength, meta, personas)

    def delete(self, name: str) -> None:
        self._call(self.backend.delete, name)

    def get_default(self) -> str | None:
        return self._call(self.backend.get_default)

    def set_default(self, name: str | None) -> None:
        self._call(self.backend.set_default, name)

    def ping(self) -> None:
        self._call(self.backend.ping)

    def close(self) -> None:
        self._closed.set()
        probe = self._probe
        if probe is not None:
            probe.join(self._probe_interval_s + 5.0)
        self.backend.close()

"""PostgreSQL for the store tests: the server `.ci/services.sh` starts, one schema per test.

The tests skip when ``MPO_TEST_POSTGRES_URL`` is unset, except under CI (``CI`` set),
where a missing database is a failure: the suite must not go green without running them.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import quote

import pytest

URL_ENV = "MPO_TEST_POSTGRES_URL"


def unavailable(problem: str) -> None:
    """Skip the calling test, or fail it under CI, where these tests must run."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL store tests cannot run under CI: {problem}", pytrace=False)
    pytest.skip(problem)


def require_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        unavailable(f"psycopg is not installed ({exc}): pip install -e '.[dev]'")


def postgres_url() -> str:
    """The test server's URL, or skip (fail under CI) with the reason."""
    require_psycopg()
    url = os.environ.get(URL_ENV)
    if not url:
        unavailable(f"{URL_ENV} is not set: run `. .ci/services.sh` first")
    assert url is not None
    return url


def with_search_path(url: str, schema: str) -> str:
    """``url`` with libpq's ``options`` selecting ``schema`` (the store's tables go there)."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-csearch_path={schema}', safe='')}"


@contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """A new empty schema; yields the URL that selects it; drops it afterwards."""
    import psycopg

    schema = f"mpo_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def sql(url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on its own connection (autocommit); the rows it returned."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.005) -> float:
    """Poll ``check`` until true; the seconds it took. AssertionError after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TcpProxy:
    """A loopback TCP relay to the database that a test can cut and restore (an outage)."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))
        server.settimeout(0.1)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and break the open ones."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, server: socket.socket) -> None:
        while self._server is server:
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

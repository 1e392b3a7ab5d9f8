"""Weight profiles in PostgreSQL, shared by every replica (``MPO_STORE_URL=postgresql://...``).

Same semantics as ``SQLiteProfileStore`` (one family's rows, versions per name never
reused, tombstones on delete, history kept, default cleared on delete, the old schema's
profiles adopted once per family); what differs is how replicas stay in step:

- Every write runs in one transaction that takes an advisory lock on the profile's name
  (so concurrent writers in any process get consecutive versions) and sends
  ``NOTIFY mpo_profiles`` with the schema, family and name. PostgreSQL delivers the
  notification when the transaction commits, so no replica hears of a change it cannot
  read yet.
- Reads go through an in-process cache, trusted only while a listener thread holds a live
  ``LISTEN`` connection: a notification drops the entries of its name; a reconnect drops
  the whole cache (notifications sent while it was away are lost). Replicas therefore see
  a change within milliseconds of its commit.
- Every connection gives up after the connect timeout and every statement after the
  statement timeout (``StoreTimeouts``); an unreachable database is ``StoreUnavailable``
  (HTTP 503) for reads and writes alike. Answering from what a replica read before an
  outage is the server's job (``server/store/served.py``), not this class's.

Manual SQL on the tables bypasses the notifications: run ``NOTIFY mpo_profiles`` afterwards
(any payload that is not this store's JSON drops every replica's whole cache).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Json
from psycopg_pool import ConnectionPool

from mpo_core.errors import ConfigError, UnknownProfile

from .base import (
    UNSCOPED,
    DeletedProfile,
    Family,
    ProfileVersion,
    ProfileVersions,
    StoreTimeouts,
    StoreUnavailable,
    adopted_names,
    found_version,
    prepare_put,
    readable_versions,
)

logger = logging.getLogger(__name__)

CHANNEL = "mpo_profiles"
_LOCK_CLASS = 0x4D504F  # "MPO": first key of the advisory locks this store takes
_SCHEMA_LOCK = 0  # second key while creating the tables
_CONNECT_DEFAULTS = {  # libpq settings, unless the URL sets them
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",  # ms: a send left unacknowledged this long drops the link
}
_DISCONNECTED = (psycopg.OperationalError, psycopg.InterfaceError)

# Rows are keyed by family (base.Family.key). The old, family-less tables
# (mpo_profile_versions, mpo_store_settings) are left as they were: each family adopts
# the profiles there that fit it once, on its first open (``_adopt_legacy``).
_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS mpo_family_profile_versions (
    family     text             NOT NULL,
    name       text             NOT NULL,
    version    integer          NOT NULL,
    weights    json,                       -- NULL marks a deletion (tombstone)
    strength   double precision NOT NULL DEFAULT 1.0,
    meta       json             NOT NULL DEFAULT '{}',
    created_at double precision NOT NULL,  -- unix seconds
    personas   json             NOT NULL DEFAULT '{}',  -- the personas it brings
    PRIMARY KEY (family, name, version)
);
-- a table made before profiles held personas gains the column (each row: none)
ALTER TABLE mpo_family_profile_versions
    ADD COLUMN IF NOT EXISTS personas json NOT NULL DEFAULT '{}';
CREATE TABLE IF NOT EXISTS mpo_family_settings (
    family text NOT NULL,
    key    text NOT NULL,
    value  text,
    PRIMARY KEY (family, key)
);
"""
_COLUMNS = "name, version, weights, strength, meta, created_at, personas"
# The old, family-less table's columns (it has no personas), for adopting its rows.
_LEGACY_COLUMNS = "name, version, weights, strength, meta, created_at"
# json (not jsonb) keeps the weights' key order, as SQLite's text does; names sort bytewise
# (COLLATE "C") as in SQLite, whatever the database's collation.
_LIST = f"""
SELECT {_COLUMNS} FROM (
    SELECT DISTINCT ON (name) {_COLUMNS} FROM mpo_family_profile_versions
    WHERE family = %(family)s ORDER BY name, version DESC
) latest WHERE weights IS NOT NULL ORDER BY name COLLATE "C"
"""
_LATEST = (
    f"SELECT {_COLUMNS} FROM mpo_family_profile_versions "
    "WHERE family = %(family)s AND name = %(name)s ORDER BY version DESC LIMIT 1"
)
_VERSION = (
    f"SELECT {_COLUMNS} FROM mpo_family_profile_versions "
    "WHERE family = %(family)s AND name = %(name)s AND version = %(version)s"
)
_HISTORY = (
    f"SELECT {_COLUMNS} FROM mpo_family_profile_versions "
    "WHERE family = %(family)s AND name = %(name)s ORDER BY version"
)
_NEXT_VERSION = (
    "SELECT COALESCE(MAX(version), 0) + 1 FROM mpo_family_profile_versions "
    "WHERE family = %(family)s AND name = %(name)s"
)
_GET_DEFAULT = (
    "SELECT value FROM mpo_family_settings WHERE family = %(family)s AND key = 'default_profile'"
)
_LEGACY_ADOPTED = "legacy_adopted"  # mpo_family_settings key: the old tables were read once

T = TypeVar("T")
CacheKey = tuple[Any, ...]


def describe_url(conninfo: str) -> str:
    """The URL without credentials, for messages and logs."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid PostgreSQL profile store URL: {exc}") from None
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"postgresql://{host}:{params.get('port') or 5432}/{params.get('dbname') or ''}"


class ReadCache:
    """Read results by key, with a generation counter against stale fills.

    A reader notes ``generation`` before its query and stores the result only if no
    invalidation happened meanwhile, so a value read just before a write commits never
    outlives that write's invalidation.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._entries: dict[CacheKey, Any] = {}
        self._max_entries = max_entries  # bounded: clients can name any profile
        self.generation = 0
        self._trusted_until = 0.0  # monotonic deadline set by the listener's lease

    def trust(self, lease_s: float) -> None:
        self._trusted_until = time.monotonic() + lease_s

    def distrust(self) -> None:
        self._trusted_until = 0.0

    @property
    def trusted(self) -> bool:
        return time.monotonic() < self._trusted_until

    def lookup(self, key: CacheKey, stale_ok: bool = False) -> tuple[bool, Any]:
        """(hit, value); values are served fresh only while the listener vouches for them."""
        if not (stale_ok or self.trusted):
            return False, None
        with self._lock:
            if key in self._entries:
                return True, self._entries[key]
        return False, None

    def store(self, key: CacheKey, value: Any, generation: int) -> None:
        with self._lock:
            if generation != self.generation:
                return
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[key] = value

    def invalidate(self, name: str | None, everything: bool = False) -> None:
        """Drop a name's entries (and the list and default), or everything."""
        with self._lock:
            self.generation += 1
            if everything:
                self._entries.clear()
                return
            for key in [k for k in self._entries if len(k) > 1 and k[1] == name]:
                del self._entries[key]
            self._entries.pop(("list",), None)
            self._entries.pop(("default",), None)


class Listener(threading.Thread):
    """Holds a ``LISTEN`` connection, reconnecting with backoff; keeps the cache honest."""

    def __init__(
        self,
        conninfo: str,
        kwargs: dict[str, Any],
        on_payload: Callable[[str], None],
        cache: ReadCache,
        poll_s: float = 0.25,
        probe_s: float = 1.0,
        lease_s: float = 5.0,
    ) -> None:
        super().__init__(name="mpo-store-listener", daemon=True)
        self._conninfo = conninfo
        self.application_name = f"mpo-store-listener-{uuid.uuid4().hex[:12]}"
        self._kwargs = {**kwargs, "application_name": self.application_name}
        self._on_payload = on_payload
        self._cache = cache
        self._poll_s, self._probe_s, self._lease_s = poll_s, probe_s, lease_s
        self._stop_event = threading.Event()
        self.listening = threading.Event()  # set while LISTEN is active
        self.connections = 0  # successful (re)connections so far
        self.notifications = 0  # notifications handled so far

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        self.join(timeout)

    def run(self) -> None:
        backoff = 0.1
        while not self._stop_event.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, **self._kwargs) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._connected()
                    backoff = 0.1
                    self._pump(conn)
            except psycopg.Error as exc:
                self._disconnected()
                if self._stop_event.is_set():
                    break
                logger.warning("profile store listener lost its connection (%s); retrying", exc)
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        self._disconnected()

    def _connected(self) -> None:
        # LISTEN is active: from here no change is missed, so drop what may have been.
        self._cache.invalidate(None, everything=True)
        self._cache.trust(self._lease_s)
        self.connections += 1
        self.listening.set()
        if self.connections > 1:
            logger.info("profile store listener reconnected; cache dropped")

    def _disconnected(self) -> None:
        self.listening.clear()
        self._cache.distrust()

    def _pump(self, conn: psycopg.Connection[Any]) -> None:
        """Hand notifications over as they come; a round trip every probe_s renews the lease."""
        next_probe = time.monotonic() + self._probe_s
        while not self._stop_event.is_set():
            for notify in conn.notifies(timeout=self._poll_s):
                self._on_payload(notify.payload)
                self.notifications += 1
            if time.monotonic() >= next_probe:
                conn.execute("SELECT 1")  # notifications arriving meanwhile are kept for us
                self._cache.trust(self._lease_s)
                next_probe = time.monotonic() + self._probe_s


class PostgresProfileStore:
    """One family's profiles in PostgreSQL (psycopg 3 with a connection pool); thread-safe.

    ``url`` is a libpq URL or conninfo string; the tables go into the first schema of the
    connection's ``search_path`` (``?options=-csearch_path%3Dmpo`` picks one). A
    ``connect_timeout`` in the URL wins over ``timeouts.connect_s``.
    """

    def __init__(
        self,
        url: str,
        *,
        family: Family = UNSCOPED,
        timeouts: StoreTimeouts | None = None,
        max_connections: int = 8,
        pool_timeout_s: float | None = None,
        cache: bool = True,
    ) -> None:
        self.url = describe_url(url)
        self.family = family
        timeouts = timeouts or StoreTimeouts()
        params = conninfo_to_dict(url)
        kwargs: dict[str, Any] = {k: v for k, v in _CONNECT_DEFAULTS.items() if k not in params}
        kwargs.setdefault("connect_timeout", str(max(1, round(timeouts.connect_s))))
        base = {**kwargs, "application_name": params.get("application_name", "mpo-store")}
        self._statement_ms = max(1, int(timeouts.statement_s * 1000))
        self._schema = self._create_tables(url, base)
        self._cache = ReadCache()
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={**base, "autocommit": True},
            configure=self._configure,
            check=ConnectionPool.check_connection,  # drop links broken by a restart
            timeout=timeouts.connect_s if pool_timeout_s is None else pool_timeout_s,
            reconnect_timeout=10.0,  # then start over: a long outage leaves no long backoff
            name="mpo-store",
            open=True,
        )
        self._listener: Listener | None = None
        if cache:
            self._listener = Listener(url, kwargs, self._on_payload, self._cache)
            self._listener.start()
            self._listener.listening.wait(timeouts.connect_s)
        logger.info("profile store: %s (schema %s, family %r)", self.url, self._schema, family.key)

    # -- setup ---------------------------------------------------------------------
    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"SET statement_timeout = {self._statement_ms}")

    def _create_tables(self, url: str, kwargs: dict[str, Any]) -> str:
        """Create the tables and adopt the old schema's profiles (once, under a lock:
        replicas may start together); the schema."""
        try:
            with psycopg.connect(url, autocommit=True, **kwargs) as conn, conn.transaction():
                self._configure(conn)
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _SCHEMA_LOCK))
                conn.execute(_SCHEMA_SQL)
                row = conn.execute("SELECT current_schema()").fetchone()
                if row is not None and row[0] is not None:
                    self._adopt_legacy(conn)
        except _DISCONNECTED as exc:
            raise StoreUnavailable(f"cannot open the profile store at {self.url}: {exc}") from exc
        except psycopg.errors.InvalidSchemaName as exc:
            raise ConfigError(f"profile store at {self.url}: no usable schema: {exc}") from exc
        if row is None or row[0] is None:
            raise ConfigError(f"profile store at {self.url}: search_path names no schema")
        return str(row[0])

    def _adopt_legacy(self, conn: psycopg.Connection[Any]) -> None:
        """Copy the old schema's profiles that fit this family, once per family."""
        key = self.family.key
        marked = conn.execute(
            "INSERT INTO mpo_family_settings (family, key, value) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (key, _LEGACY_ADOPTED, str(time.time())),
        )
        if marked.rowcount == 0:
            return  # adopted before
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            )
        }
        if "mpo_profile_versions" not in tables:
            return
        rows = conn.execute("SELECT name, weights FROM mpo_profile_versions").fetchall()
        names = sorted(adopted_names(self.family, rows))
        if not names:
            return
        conn.execute(
            f"INSERT INTO mpo_family_profile_versions (family, {_LEGACY_COLUMNS}) "
            f"SELECT %s, {_LEGACY_COLUMNS} FROM mpo_profile_versions WHERE name = ANY(%s) "
            "ON CONFLICT DO NOTHING",
            (key, names),
        )
        default = None
        if "mpo_store_settings" in tables:
            found = conn.execute(
                "SELECT value FROM mpo_store_settings WHERE key = 'default_profile'"
            ).fetchone()
            default = None if found is None else found[0]
        if default in names and _latest_row(conn, key, default) is not None:
            conn.execute(
                "INSERT INTO mpo_family_settings (family, key, value) "
                "VALUES (%s, 'default_profile', %s) ON CONFLICT DO NOTHING",
                (key, default),
            )
        logger.info(
            "profile store %s: family %r adopted %d profile(s) of the old schema: %s",
            self.url, key, len(names), ", ".join(names),
        )  # fmt: skip

    def listener_status(self) -> dict[str, Any]:
        """For diagnostics and tests: is the cache live, and how often it reconnected."""
        listener = self._listener
        return {
            "listening": bool(listener and listener.listening.is_set()),
            "connections": listener.connections if listener else 0,
            "notifications": listener.notifications if listener else 0,
            "application_name": listener.application_name if listener else None,
            "cache_trusted": self._cache.trusted,
        }

    def _on_payload(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            schema, family, name = message["schema"], message["family"], message["name"]
        except (ValueError, TypeError, KeyError):
            self._cache.invalidate(None, everything=True)  # someone's manual NOTIFY
            return
        if schema == self._schema and family == self.family.key:
            self._cache.invalidate(name)

    # -- reads ---------------------------------------------------------------------
    def _read(self, key: CacheKey, query: Callable[[psycopg.Connection[Any]], T]) -> T:
        hit, value = self._cache.lookup(key)
        if hit:
            return _copy(value)
        generation = self._cache.generation
        try:
            with self._pool.connection() as conn:
                value = query(conn)
        except _DISCONNECTED as exc:
            raise StoreUnavailable(
                f"the profile store at {self.url} is unreachable ({exc}); retry shortly"
            ) from exc
        self._cache.store(key, value, generation)
        return _copy(value)

    def _args(self, **more: Any) -> dict[str, Any]:
        return {"family": self.family.key, **more}

    def list(self) -> ProfileVersions:
        return self._read(
            ("list",), lambda c: readable_versions(c.execute(_LIST, self._args()).fetchall())
        )

    def get(self, name: str, version: int | None = None) -> ProfileVersion:
        # rows are cached as stored; found_version decides (and raises) on every read
        row: tuple[Any, ...] | None
        if version is None:
            row = self._read(("latest", name), lambda c: _one(c, _LATEST, self._args(name=name)))
        else:
            args = self._args(name=name, version=version)
            row = self._read(("version", name, version), lambda c: _one(c, _VERSION, args))
        return found_version(name, row, version)

    def history(self, name: str) -> ProfileVersions:
        rows = self._read(
            ("history", name), lambda c: c.execute(_HISTORY, self._args(name=name)).fetchall()
        )
        if not rows:
            raise UnknownProfile(name)
        return readable_versions(rows)

    def get_default(self) -> str | None:
        def query(conn: psycopg.Connection[Any]) -> str | None:
            row = conn.execute(_GET_DEFAULT, self._args()).fetchone()
            return None if row is None or row[0] is None else str(row[0])

        return self._read(("default",), query)

    def ping(self) -> None:
        try:
            with self._pool.connection() as conn:
                conn.execute("SELECT 1")
        except _DISCONNECTED as exc:
            raise StoreUnavailable(
                f"the profile store at {self.url} is unreachable ({exc})"
            ) from exc

    # -- writes --------------------------------------------------------------------
    @contextmanager
    def _write(self, name: str | None) -> Iterator[psycopg.Connection[Any]]:
        """One transaction: lock the name, run the body, notify (delivered at commit)."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                if name is not None:
                    conn.execute(
                        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                        (_LOCK_CLASS, f"{self._schema}.{self.family.key}.{name}"),
                    )
                yield conn
                payload = json.dumps(
                    {"schema": self._schema, "family": self.family.key, "name": name}
                )
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
        except _DISCONNECTED as exc:
            raise StoreUnavailable(
                f"the profile store at {self.url} is unreachable ({exc}); nothing was "
                "changed unless the commit itself was cut off; retry shortly"
            ) from exc
        finally:
            self._cache.invalidate(name)  # our own reads see the write at once

    def put(
        self,
        name: str,
        weights: dict[str, float],
        strength: float = 1.0,
        meta: dict[str, Any] | None = None,
        personas: dict[str, Any] | None = None,
    ) -> ProfileVersion:
        new = prepare_put(name, weights, strength, meta, personas)
        with self._write(name) as conn:
            version = _next_version(conn, self.family.key, name)
            conn.execute(
                f"INSERT INTO mpo_family_profile_versions (family, {_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (self.family.key, name, version, Json(new.weights), new.strength,
                 Json(new.meta), new.created_at, Json(new.request_personas)),
            )  # fmt: skip
        return new.version(name, version)

    def delete(self, name: str) -> None:
        key = self.family.key
        with self._write(name) as conn:
            row = conn.execute(_LATEST, {"family": key, "name": name}).fetchone()
            if row is None:
                raise UnknownProfile(name)
            if row[2] is None:
                raise DeletedProfile(name, int(row[1]))
            conn.execute(
                "INSERT INTO mpo_family_profile_versions "
                "(family, name, version, weights, created_at) VALUES (%s, %s, %s, NULL, %s)",
                (key, name, _next_version(conn, key, name), time.time()),
            )
            conn.execute(
                "DELETE FROM mpo_family_settings "
                "WHERE family = %s AND key = 'default_profile' AND value = %s",
                (key, name),
            )

    def set_default(self, name: str | None) -> None:
        key = self.family.key
        with self._write(name) as conn:  # the name's lock orders it against its deletion
            if name is None:
                conn.execute(
                    "DELETE FROM mpo_family_settings WHERE family = %s AND key = 'default_profile'",
                    (key,),
                )
                return
            row = conn.execute(_LATEST, {"family": key, "name": name}).fetchone()
            # a deleted, unknown or unreadable profile is refused as the default
            found_version(name, None if row is None else tuple(row))
            conn.execute(
                "INSERT INTO mpo_family_settings (family, key, value) "
                "VALUES (%s, 'default_profile', %s) "
                "ON CONFLICT (family, key) DO UPDATE SET value = excluded.value",
                (key, name),
            )

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        self._pool.close(timeout=5.0)


def _next_version(conn: psycopg.Connection[Any], family: str, name: str) -> int:
    row = conn.execute(_NEXT_VERSION, {"family": family, "name": name}).fetchone()
    assert row is not None  # an aggregate always returns one row
    return int(row[0])


def _latest_row(conn: psycopg.Connection[Any], family: str, name: str) -> tuple[Any, ...] | None:
    """The name's newest row as stored, or None when there is none or it is a tombstone."""
    row = conn.execute(_LATEST, {"family": family, "name": name}).fetchone()
    return None if row is None or row[2] is None else tuple(row)


def _one(conn: psycopg.Connection[Any], query: str, args: dict[str, Any]) -> tuple[Any, ...] | None:
    row = conn.execute(query, args).fetchone()
    return None if row is None else tuple(row)


def _copy(value: T) -> T:
    """Cached values are shared: hand out copies whose dicts a caller may change."""
    if isinstance(value, ProfileVersion):
        copied = replace(value, weights=dict(value.weights), meta=dict(value.meta))
        return copied  # type: ignore[return-value]
    if isinstance(value, list):
        return [_copy(v) for v in value]  # type: ignore[return-value]
    return value

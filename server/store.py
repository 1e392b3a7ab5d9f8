"""Weight profiles: named mixing weights, versioned, persisted.

Every ``put`` appends a new version; nothing is overwritten, so the history of a profile
stays readable and a rollback is a ``put`` of an old version's content. ``delete`` appends
a tombstone (the name disappears from ``list`` but its history stays). One profile may be
marked default; requests that name none use it (uniform weights when none is marked).

``ProfileStore`` is the backend-neutral interface; ``SQLiteProfileStore`` is the default
backend. ``open_store(url)`` picks a backend from the URL's scheme: add new backends there.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mpo_core.errors import ConfigError, InvalidParameter, UnknownProfile

PROFILE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True)
class ProfileVersion:
    """One stored version of a profile."""

    name: str
    version: int  # 1, 2, ... per name; never reused, even across delete and re-create
    weights: dict[str, float]
    strength: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)  # free-form: who, why, fit job id
    created_at: float = 0.0  # unix seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "weights": dict(self.weights),
            "strength": self.strength,
            "meta": dict(self.meta),
            "created_at": self.created_at,
        }


ProfileVersions = list[ProfileVersion]  # alias: the stores' ``list`` method shadows the builtin


def validate_profile_name(name: str) -> str:
    if not isinstance(name, str) or not PROFILE_NAME_PATTERN.match(name):
        raise InvalidParameter(
            "name",
            f"invalid profile name {name!r}: use 1-64 letters, digits, '_', '.', '-' "
            "starting with a letter or digit",
        )
    return name


def validate_profile_content(weights: dict[str, float], strength: float) -> None:
    """Checks a store can make without knowing the policies (the server checks names)."""
    if not isinstance(weights, dict) or not weights:
        raise InvalidParameter("weights", f"weights must be a non-empty mapping, got {weights!r}")
    for key, value in weights.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidParameter(
                f"weights.{key}", f"weight of {key!r} must be finite and >= 0, got {value!r}"
            )
    if sum(weights.values()) <= 0:
        raise InvalidParameter("weights", "weights must not all be zero")
    if not isinstance(strength, (int, float)) or not math.isfinite(strength) or strength < 0:
        raise InvalidParameter("strength", f"strength must be finite and >= 0, got {strength!r}")


def prepare_put(
    name: str, weights: dict[str, float], strength: float, meta: dict[str, Any] | None
) -> tuple[dict[str, float], dict[str, Any], float]:
    """Validate a new version's content; return weights, meta and the time, as stored."""
    validate_profile_name(name)
    validate_profile_content(weights, strength)
    return {str(k): float(v) for k, v in weights.items()}, dict(meta or {}), time.time()


@runtime_checkable
class ProfileStore(Protocol):
    """What the server needs from a profile backend. Implementations must be thread-safe."""

    def list(self) -> ProfileVersions:
        """The current version of every live profile, sorted by name."""
        ...

    def get(self, name: str, version: int | None = None) -> ProfileVersion:
        """The current version (or a given one, even of a deleted profile); UnknownProfile."""
        ...

    def history(self, name: str) -> ProfileVersions:
        """Every stored version, oldest first; UnknownProfile when the name was never stored."""
        ...

    def put(
        self,
        name: str,
        weights: dict[str, float],
        strength: float = 1.0,
        meta: dict[str, Any] | None = None,
    ) -> ProfileVersion:
        """Store a new version (creating the profile if needed) and return it."""
        ...

    def delete(self, name: str) -> None:
        """Remove a live profile (history kept); clears the default if it pointed here."""
        ...

    def get_default(self) -> str | None:
        """The default profile's name, or None (uniform weights)."""
        ...

    def set_default(self, name: str | None) -> None:
        """Mark a live profile default (None: back to uniform); UnknownProfile."""
        ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS profile_versions (
    name       TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    weights    TEXT,              -- JSON object; NULL marks a deletion (tombstone)
    strength   REAL    NOT NULL DEFAULT 1.0,
    meta       TEXT    NOT NULL DEFAULT '{}',
    created_at REAL    NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS store_settings (
    key   TEXT PRIMARY KEY,
    value TEXT
);
"""

_LATEST = """
SELECT v.name, v.version, v.weights, v.strength, v.meta, v.created_at
FROM profile_versions v
JOIN (SELECT name, MAX(version) AS version FROM profile_versions GROUP BY name) m
  ON v.name = m.name AND v.version = m.version
"""


class SQLiteProfileStore:
    """Profiles in one SQLite file (WAL mode): safe for several threads and processes.

    Each call opens its own connection, so threads never share one; writes run in
    ``BEGIN IMMEDIATE`` transactions, which serialise writers across processes, so two
    concurrent puts never get the same version number.
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._timeout = busy_timeout_s
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def list(self) -> ProfileVersions:
        with self._connect() as conn:
            rows = conn.execute(_LATEST + " WHERE v.weights IS NOT NULL ORDER BY v.name").fetchall()
        return [_row_to_version(r) for r in rows]

    def get(self, name: str, version: int | None = None) -> ProfileVersion:
        with self._connect() as conn:
            if version is None:
                row = conn.execute(_LATEST + " WHERE v.name = ?", (name,)).fetchone()
            else:
                row = conn.execute(
                    "SELECT name, version, weights, strength, meta, created_at "
                    "FROM profile_versions WHERE name = ? AND version = ?",
                    (name, version),
                ).fetchone()
        if row is None or row[2] is None:
            if version is not None:
                raise UnknownProfile(f"{name}@{version}")
            raise UnknownProfile(name)
        return _row_to_version(row)

    def history(self, name: str) -> ProfileVersions:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT name, version, weights, strength, meta, created_at FROM profile_versions "
                "WHERE name = ? AND weights IS NOT NULL ORDER BY version",
                (name,),
            ).fetchall()
        if not rows:
            raise UnknownProfile(name)
        return [_row_to_version(r) for r in rows]

    def put(
        self,
        name: str,
        weights: dict[str, float],
        strength: float = 1.0,
        meta: dict[str, Any] | None = None,
    ) -> ProfileVersion:
        weights, meta, now = prepare_put(name, weights, strength, meta)
        with self._write() as conn:
            version = _next_version(conn, name)
            conn.execute(
                "INSERT INTO profile_versions (name, version, weights, strength, meta, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, version, json.dumps(weights), float(strength), json.dumps(meta), now),
            )
        return ProfileVersion(name, version, weights, float(strength), meta, now)

    def delete(self, name: str) -> None:
        with self._write() as conn:
            row = conn.execute(_LATEST + " WHERE v.name = ?", (name,)).fetchone()
            if row is None or row[2] is None:
                raise UnknownProfile(name)
            conn.execute(
                "INSERT INTO profile_versions (name, version, weights, created_at) "
                "VALUES (?, ?, NULL, ?)",
                (name, _next_version(conn, name), time.time()),
            )
            conn.execute(
                "DELETE FROM store_settings WHERE key = 'default_profile' AND value = ?", (name,)
            )

    def get_default(self) -> str | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT value FROM store_settings WHERE key = 'default_profile'"
            ).fetchone()
        return None if row is None else str(row[0])

    def set_default(self, name: str | None) -> None:
        with self._write() as conn:
            if name is None:
                conn.execute("DELETE FROM store_settings WHERE key = 'default_profile'")
                return
            row = conn.execute(_LATEST + " WHERE v.name = ?", (name,)).fetchone()
            if row is None or row[2] is None:
                raise UnknownProfile(name)
            conn.execute(
                "INSERT INTO store_settings (key, value) VALUES ('default_profile', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (name,),
            )

    def close(self) -> None:
        """Nothing is held between calls; kept for the interface."""


def _next_version(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute(
        "SELECT COALESCE(MAX(version), 0) FROM profile_versions WHERE name = ?", (name,)
    ).fetchone()
    return int(row[0]) + 1


def _row_to_version(row: tuple[Any, ...]) -> ProfileVersion:
    name, version, weights, strength, meta, created_at = row
    return ProfileVersion(
        name=name,
        version=int(version),
        weights=json.loads(weights),
        strength=float(strength),
        meta=json.loads(meta),
        created_at=float(created_at),
    )


def open_store(url: str) -> ProfileStore:
    """A store for ``url``: ``sqlite:///abs/path.db`` (or a bare path) for SQLite.

    A PostgreSQL backend (``postgresql://...``) plugs in here behind the same interface.
    """
    if url.startswith("sqlite:///"):
        # SQLAlchemy's convention: sqlite:///rel.db is relative, sqlite:////abs.db absolute
        return SQLiteProfileStore(url[len("sqlite:///") :])
    if "://" not in url:
        return SQLiteProfileStore(url)
    scheme = url.split("://", 1)[0]
    if scheme in ("postgresql", "postgres"):
        try:  # lazy: psycopg comes with the optional `postgres` extra
            from .store_postgres import PostgresProfileStore
        except ImportError as exc:
            raise ConfigError(
                f"a {scheme}:// profile store needs psycopg 3 ({exc}); "
                "install it with: pip install 'mpo-server[postgres]'"
            ) from exc
        return PostgresProfileStore(url)
    raise ConfigError(
        f"unsupported profile store URL scheme {scheme!r} in {url!r}; "
        "use sqlite:///PATH or postgresql://..."
    )

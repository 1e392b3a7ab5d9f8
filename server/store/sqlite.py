"""Weight profiles in one SQLite file: the default backend (``sqlite:///path.db``)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mpo_core.errors import UnknownProfile

from .base import ProfileVersion, ProfileVersions, checked_version, prepare_put, readable_versions

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
        return readable_versions(rows)

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
        return checked_version(*row)  # UnreadableProfile for a row that breaks the rules

    def history(self, name: str) -> ProfileVersions:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT name, version, weights, strength, meta, created_at FROM profile_versions "
                "WHERE name = ? AND weights IS NOT NULL ORDER BY version",
                (name,),
            ).fetchall()
        if not rows:
            raise UnknownProfile(name)
        return readable_versions(rows)

    def put(
        self,
        name: str,
        weights: dict[str, float],
        strength: float = 1.0,
        meta: dict[str, Any] | None = None,
    ) -> ProfileVersion:
        new = prepare_put(name, weights, strength, meta)
        with self._write() as conn:
            version = _next_version(conn, name)
            conn.execute(
                "INSERT INTO profile_versions (name, version, weights, strength, meta, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, version, json.dumps(new.weights), new.strength, json.dumps(new.meta),
                 new.created_at),
            )  # fmt: skip
        return ProfileVersion(name, version, new.weights, new.strength, new.meta, new.created_at)

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
            checked_version(*row)  # a default that requests could not read: refused
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

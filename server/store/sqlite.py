"""Weight profiles in one SQLite file: the default backend (``sqlite:///path.db``)."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mpo_core.errors import UnknownProfile

from .base import (
    UNSCOPED,
    DeletedProfile,
    Family,
    ProfileVersion,
    ProfileVersions,
    StoreUnavailable,
    adopted_names,
    found_version,
    prepare_put,
    readable_versions,
)

logger = logging.getLogger(__name__)

# Rows are keyed by family (base.Family.key). The tables of the old, family-less schema
# (profile_versions, store_settings) are left as they were: each family adopts the
# profiles there that fit it once, on its first open (``_adopt_legacy``).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS family_profile_versions (
    family     TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    weights    TEXT,              -- JSON object; NULL marks a deletion (tombstone)
    strength   REAL    NOT NULL DEFAULT 1.0,
    meta       TEXT    NOT NULL DEFAULT '{}',
    created_at REAL    NOT NULL,
    personas   TEXT    NOT NULL DEFAULT '{}',  -- JSON object: the personas it brings
    PRIMARY KEY (family, name, version)
);
CREATE TABLE IF NOT EXISTS family_settings (
    family TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  TEXT,
    PRIMARY KEY (family, key)
);
"""
_COLUMNS = "name, version, weights, strength, meta, created_at, personas"
# The old, family-less table's columns (it has no personas), for adopting its rows.
_LEGACY_COLUMNS = "name, version, weights, strength, meta, created_at"
_LATEST = f"""
SELECT {_COLUMNS} FROM family_profile_versions
WHERE family = ? AND name = ? ORDER BY version DESC LIMIT 1
"""
_LIST = """
SELECT v.name, v.version, v.weights, v.strength, v.meta, v.created_at, v.personas
FROM family_profile_versions v
JOIN (SELECT name, MAX(version) AS version FROM family_profile_versions
      WHERE family = ? GROUP BY name) m
  ON v.name = m.name AND v.version = m.version
WHERE v.family = ? AND v.weights IS NOT NULL ORDER BY v.name
"""
_SET_DEFAULT = """
INSERT INTO family_settings (family, key, value) VALUES (?, 'default_profile', ?)
ON CONFLICT(family, key) DO UPDATE SET value = excluded.value
"""
_LEGACY_ADOPTED = "legacy_adopted"  # family_settings key: the old tables were read once


class SQLiteProfileStore:
    """One family's profiles in one SQLite file (WAL mode): safe for several threads and
    processes, and for several families in one file.

    Each call opens its own connection, so threads never share one; writes run in
    ``BEGIN IMMEDIATE`` transactions, which serialise writers across processes, so two
    concurrent puts never get the same version number. A file that cannot be read or
    stays locked past the busy timeout is StoreUnavailable (503).
    """

    def __init__(
        self, path: str | Path, family: Family = UNSCOPED, busy_timeout_s: float = 10.0
    ) -> None:
        self.path = Path(path)
        self.family = family
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._timeout = busy_timeout_s
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
        self._add_personas_column()
        self._adopt_legacy()

    def _add_personas_column(self) -> None:
        """A file made before profiles held personas gains the column (each row: none)."""
        with self._write() as conn:
            columns = {r[1] for r in conn.execute("PRAGMA table_info(family_profile_versions)")}
            if "personas" not in columns:
                conn.execute(
                    "ALTER TABLE family_profile_versions "
                    "ADD COLUMN personas TEXT NOT NULL DEFAULT '{}'"
                )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"cannot open the profile store {self.path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            yield conn
        except sqlite3.OperationalError as exc:  # locked past the timeout, disk errors
            raise StoreUnavailable(f"the profile store {self.path} failed: {exc}") from exc
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

    def _adopt_legacy(self) -> None:
        """Copy the old schema's profiles that fit this family, once per family."""
        key = self.family.key
        with self._write() as conn:
            done = conn.execute(
                "SELECT 1 FROM family_settings WHERE family = ? AND key = ?",
                (key, _LEGACY_ADOPTED),
            ).fetchone()
            if done is not None:
                return
            conn.execute(
                "INSERT INTO family_settings (family, key, value) VALUES (?, ?, ?)",
                (key, _LEGACY_ADOPTED, str(time.time())),
            )
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            if "profile_versions" not in tables:
                return
            rows = conn.execute("SELECT name, weights FROM profile_versions").fetchall()
            names = adopted_names(self.family, rows)
            for name in sorted(names):
                conn.execute(
                    f"INSERT OR IGNORE INTO family_profile_versions (family, {_LEGACY_COLUMNS}) "
                    f"SELECT ?, {_LEGACY_COLUMNS} FROM profile_versions WHERE name = ?",
                    (key, name),
                )
            default = None
            if "store_settings" in tables:
                row = conn.execute(
                    "SELECT value FROM store_settings WHERE key = 'default_profile'"
                ).fetchone()
                default = None if row is None else row[0]
            live = default in names and _live_row(conn, key, default) is not None
            if live:
                conn.execute(
                    "INSERT OR IGNORE INTO family_settings (family, key, value) "
                    "VALUES (?, 'default_profile', ?)",
                    (key, default),
                )
        if names:
            logger.info(
                "profile store %s: family %r adopted %d profile(s) of the old schema: %s%s",
                self.path, key, len(names), ", ".join(sorted(names)),
                f" (default {default!r})" if live else "",
            )  # fmt: skip

    def list(self) -> ProfileVersions:
        key = self.family.key
        with self._connect() as conn:
            rows = conn.execute(_LIST, (key, key)).fetchall()
        return readable_versions(rows)

    def get(self, name: str, version: int | None = None) -> ProfileVersion:
        with self._connect() as conn:
            if version is None:
                row = conn.execute(_LATEST, (self.family.key, name)).fetchone()
            else:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM family_profile_versions "
                    "WHERE family = ? AND name = ? AND version = ?",
                    (self.family.key, name, version),
                ).fetchone()
        return found_version(name, row, version)

    def history(self, name: str) -> ProfileVersions:
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM family_profile_versions "
                "WHERE family = ? AND name = ? ORDER BY version",
                (self.family.key, name),
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
        personas: dict[str, Any] | None = None,
    ) -> ProfileVersion:
        new = prepare_put(name, weights, strength, meta, personas)
        with self._write() as conn:
            version = _next_version(conn, self.family.key, name)
            conn.execute(
                f"INSERT INTO family_profile_versions (family, {_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (self.family.key, name, version, json.dumps(new.weights), new.strength,
                 json.dumps(new.meta), new.created_at, json.dumps(new.request_personas)),
            )  # fmt: skip
        return new.version(name, version)

    def delete(self, name: str) -> None:
        key = self.family.key
        with self._write() as conn:
            _refuse_dead(name, _latest_row(conn, key, name))  # an unreadable row may go
            conn.execute(
                "INSERT INTO family_profile_versions (family, name, version, weights, created_at) "
                "VALUES (?, ?, ?, NULL, ?)",
                (key, name, _next_version(conn, key, name), time.time()),
            )
            conn.execute(
                "DELETE FROM family_settings "
                "WHERE family = ? AND key = 'default_profile' AND value = ?",
                (key, name),
            )

    def get_default(self) -> str | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT value FROM family_settings WHERE family = ? AND key = 'default_profile'",
                (self.family.key,),
            ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def set_default(self, name: str | None) -> None:
        key = self.family.key
        with self._write() as conn:
            if name is None:
                conn.execute(
                    "DELETE FROM family_settings WHERE family = ? AND key = 'default_profile'",
                    (key,),
                )
                return
            # a deleted, unknown or unreadable profile is refused as the default
            found_version(name, _latest_row(conn, key, name))
            conn.execute(_SET_DEFAULT, (key, name))

    def ping(self) -> None:
        with self._connect() as conn:
            conn.execute("SELECT COUNT(*) FROM family_settings").fetchone()

    def close(self) -> None:
        """Nothing is held between calls; kept for the interface."""


def _latest_row(conn: sqlite3.Connection, family: str, name: str | None) -> tuple[Any, ...] | None:
    row = conn.execute(_LATEST, (family, name)).fetchone()
    return None if row is None else tuple(row)


def _refuse_dead(name: str, row: tuple[Any, ...] | None) -> None:
    """UnknownProfile when there is no row, DeletedProfile when the newest is a tombstone."""
    if row is None:
        raise UnknownProfile(name)
    if row[2] is None:
        raise DeletedProfile(name, int(row[1]))


def _live_row(conn: sqlite3.Connection, family: str, name: str | None) -> tuple[Any, ...] | None:
    row = _latest_row(conn, family, name)
    return None if row is None or row[2] is None else row


def _next_version(conn: sqlite3.Connection, family: str, name: str) -> int:
    row = conn.execute(
        "SELECT COALESCE(MAX(version), 0) FROM family_profile_versions "
        "WHERE family = ? AND name = ?",
        (family, name),
    ).fetchone()
    return int(row[0]) + 1

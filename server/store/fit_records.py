"""Fit-job records in the profile store, so that every replica sees every job.

A record holds what ``GET /admin/fit/{id}`` shows (state, progress, request, error, weights,
the stored profile, the report) plus its *owner*, the process running it. Two backends:

- **SQLite** (one process, today's behaviour): one fit at a time is a lock in this process;
  a cancel is the owner's own event. Records outlive a restart, and a process that opens the
  store marks the active records of earlier processes failed (their owner is gone).
- **PostgreSQL** (replicas): the owner holds a session advisory lock for the whole job on a
  connection of its own, so one fit runs at a time cluster-wide and the lock goes when the
  owner's process dies. The same connection ``LISTEN``s on ``mpo_fit_cancel``: a cancel on
  any replica sets the record's flag and ``NOTIFY``s the job id, which the owner turns into
  its job's cancel event. A replica that reads an active record while nobody holds the lock
  knows the owner died and marks the job failed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from .base import ProfileStore, StoreUnavailable

logger = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "sampling", "scoring", "optimising")
OWNER_DIED = "the server process running this fit stopped before it finished"
CANCEL_CHANNEL = "mpo_fit_cancel"
# The fit slot's advisory lock: the store's lock class and a key of the schema (profile names
# cannot contain ":", so it never meets a profile's lock); session-level, held by the owner.
_TRY_LOCK = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"
_UNLOCK = "SELECT pg_advisory_unlock(%s, hashtext(%s))"
FIELDS = (
    "id", "owner", "state", "progress", "phase_progress", "created_at", "started_at",
    "finished_at", "request", "error", "weights", "profile", "report", "cancel_requested",
)  # fmt: skip
_JSON_FIELDS = ("request", "weights", "profile", "report")
Record = dict[str, Any]


class FitClaim(Protocol):
    """The right to run one fit: held until ``release``; ``cancelled`` is set from anywhere."""

    cancelled: threading.Event

    def release(self) -> None: ...


class FitRecords(Protocol):
    owner: str  # this process's id

    def claim(self, record: Record) -> FitClaim | None:
        """Insert ``record`` and hold the cluster's fit slot; None when another fit holds it."""
        ...

    def update(self, job_id: str, fields: Record) -> None: ...

    def get(self, job_id: str) -> Record | None: ...

    def list(self, limit: int) -> list[Record]: ...

    def request_cancel(self, job_id: str) -> Record | None:
        """Flag the job cancelled and tell its owner; the record, or None if unknown."""
        ...

    def close(self) -> None: ...


def new_owner_id() -> str:
    return f"{uuid.uuid4().hex[:12]}"


def open_fit_records(store: ProfileStore) -> FitRecords:
    """The records backend next to ``store``'s profiles (same file or database)."""
    from .guard import GuardedStore
    from .sqlite import SQLiteProfileStore

    if isinstance(store, GuardedStore):
        store = store.backend

    if isinstance(store, SQLiteProfileStore):
        return SQLiteFitRecords(store.path)
    from .postgres import PostgresProfileStore

    if isinstance(store, PostgresProfileStore):
        return PostgresFitRecords(store)
    return MemoryFitRecords()


def _encode(fields: Record) -> Record:
    return {
        k: json.dumps(v) if k in _JSON_FIELDS and v is not None else v for k, v in fields.items()
    }


def _decode(row: Record) -> Record:
    out = {
        k: json.loads(v) if k in _JSON_FIELDS and isinstance(v, str) else v for k, v in row.items()
    }
    out["cancel_requested"] = bool(out.get("cancel_requested"))
    return out


class _LocalClaim:
    def __init__(self, lock: threading.Lock) -> None:
        self.cancelled = threading.Event()
        self._lock = lock

    def release(self) -> None:
        self._lock.release()


class MemoryFitRecords:
    """Records in this process only (stores that are neither SQLite nor PostgreSQL)."""

    def __init__(self) -> None:
        self.owner = new_owner_id()
        self._records: dict[str, Record] = {}
        self._slot = threading.Lock()
        self._claims: dict[str, _LocalClaim] = {}

    def claim(self, record: Record) -> FitClaim | None:
        if not self._slot.acquire(blocking=False):
            return None
        claim = _LocalClaim(self._slot)
        self._records[record["id"]] = {**record, "owner": self.owner}
        self._claims[record["id"]] = claim
        return claim

    def update(self, job_id: str, fields: Record) -> None:
        self._records[job_id].update(fields)

    def get(self, job_id: str) -> Record | None:
        record = self._records.get(job_id)
        return None if record is None else dict(record)

    def list(self, limit: int) -> list[Record]:
        records = sorted(self._records.values(), key=lambda r: r["created_at"], reverse=True)
        return [dict(r) for r in records[:limit]]

    def request_cancel(self, job_id: str) -> Record | None:
        if job_id not in self._records:
            return None
        if self._records[job_id]["state"] in ACTIVE_STATES:
            self._records[job_id]["cancel_requested"] = True
            self._claims[job_id].cancelled.set()
        return self.get(job_id)

    def close(self) -> None:
        """Nothing to close."""


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS fit_jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, state TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0, phase_progress REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    request TEXT NOT NULL, error TEXT, weights TEXT, profile TEXT, report TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
"""


class SQLiteFitRecords:
    """Fit records in the profiles' SQLite file; one fit at a time per process."""

    def __init__(self, path: Path, busy_timeout_s: float = 10.0) -> None:
        self.owner = new_owner_id()
        self.path = path
        self._timeout = busy_timeout_s
        self._slot = threading.Lock()
        self._claims: dict[str, _LocalClaim] = {}
        with self._connect() as conn:
            conn.executescript(_SQLITE_SCHEMA)
            placeholders = ",".join("?" * len(ACTIVE_STATES))
            conn.execute(  # earlier processes' jobs: their owner is gone
                f"UPDATE fit_jobs SET state = 'failed', error = ?, finished_at = ? "
                f"WHERE state IN ({placeholders}) AND owner != ?",
                (OWNER_DIED, time.time(), *ACTIVE_STATES, self.owner),
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    def claim(self, record: Record) -> FitClaim | None:
        if not self._slot.acquire(blocking=False):
            return None
        try:
            row = _encode({**record, "owner": self.owner})
            columns = ", ".join(row)
            with self._connect() as conn:
                conn.execute(
                    f"INSERT INTO fit_jobs ({columns}) VALUES ({', '.join('?' * len(row))})",
                    tuple(row.values()),
                )
        except BaseException:
            self._slot.release()
            raise
        claim = _LocalClaim(self._slot)
        self._claims[record["id"]] = claim
        return claim

    def update(self, job_id: str, fields: Record) -> None:
        row = _encode(fields)
        assignments = ", ".join(f"{k} = ?" for k in row)
        with self._connect() as conn:
            conn.execute(f"UPDATE fit_jobs SET {assignments} WHERE id = ?", (*row.values(), job_id))

    def get(self, job_id: str) -> Record | None:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM fit_jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _decode(dict(row))

    def list(self, limit: int) -> list[Record]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT * FROM fit_jobs ORDER BY created_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_decode(dict(r)) for r in rows]

    def request_cancel(self, job_id: str) -> Record | None:
        placeholders = ",".join("?" * len(ACTIVE_STATES))
        with self._connect() as conn:
            conn.execute(
                "UPDATE fit_jobs SET cancel_requested = 1 "
                f"WHERE id = ? AND state IN ({placeholders})",
                (job_id, *ACTIVE_STATES),
            )
        claim = self._claims.get(job_id)
        if claim is not None:
            claim.cancelled.set()
        return self.get(job_id)

    def close(self) -> None:
        """Nothing is held between calls."""


_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS mpo_fit_jobs (
    id text PRIMARY KEY, owner text NOT NULL, state text NOT NULL,
    progress double precision NOT NULL DEFAULT 0,
    phase_progress double precision NOT NULL DEFAULT 0,
    created_at double precision NOT NULL, started_at double precision,
    finished_at double precision, request text NOT NULL, error text, weights text,
    profile text, report text, cancel_requested boolean NOT NULL DEFAULT false
);
"""


class _PostgresClaim:
    """The fit slot: a session advisory lock on a connection of its own, which also LISTENs
    for cancels of this job."""

    def __init__(self, conn: Any, job_id: str, lock_key: tuple[int, str]) -> None:
        self.cancelled = threading.Event()
        self._conn, self._job_id, self._lock_key = conn, job_id, lock_key
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name=f"fit-cancel-{job_id}", daemon=True
        )
        self._thread.start()

    def _watch(self) -> None:
        try:
            while not self._stop.is_set():
                for notify in self._conn.notifies(timeout=0.25):
                    if notify.payload == self._job_id:
                        self.cancelled.set()
        except Exception as exc:  # the link broke: the job goes on, cancels may be missed
            logger.warning("fit %s: cancel listener stopped (%s)", self._job_id, exc)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._conn.execute(_UNLOCK, self._lock_key)
        except Exception as exc:  # closing the connection drops the lock anyway
            logger.warning("fit %s: unlock failed (%s)", self._job_id, exc)
        finally:
            self._conn.close()


class PostgresFitRecords:
    """Fit records in the shared PostgreSQL database (see the module docstring)."""

    def __init__(self, store: Any) -> None:
        import psycopg

        self.owner = new_owner_id()
        self._psycopg = psycopg
        self._store = store
        self._pool = store._pool  # the profile store's connection pool and settings
        self._conninfo = store._pool.conninfo
        self._kwargs = dict(store._pool.kwargs)
        from .postgres import _LOCK_CLASS, _SCHEMA_LOCK

        self._lock_key = (_LOCK_CLASS, f"{store._schema}:fit-slot")
        # Replicas start together: two concurrent CREATE TABLE IF NOT EXISTS race on the
        # catalog (a unique violation in pg_type), so create under the store's schema lock.
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _SCHEMA_LOCK))
            conn.execute(_PG_SCHEMA)

    def _run(self, work: Callable[[Any], Any]) -> Any:
        try:
            with self._pool.connection() as conn:
                return work(conn)
        except (self._psycopg.OperationalError, self._psycopg.InterfaceError) as exc:
            raise StoreUnavailable(
                f"the fit records are unreachable ({exc}); retry shortly"
            ) from exc

    def claim(self, record: Record) -> FitClaim | None:
        conn = self._psycopg.connect(self._conninfo, **{**self._kwargs, "autocommit": True})
        try:
            row = conn.execute(_TRY_LOCK, self._lock_key).fetchone()
            if not row or not row[0]:
                conn.close()
                return None
            self._fail_orphans(conn)  # we hold the slot: every other active record is dead
            conn.execute(f"LISTEN {CANCEL_CHANNEL}")
            fields = _encode({**record, "owner": self.owner})
            conn.execute(
                f"INSERT INTO mpo_fit_jobs ({', '.join(fields)}) "
                f"VALUES ({', '.join(['%s'] * len(fields))})",
                tuple(fields.values()),
            )
        except BaseException:
            conn.close()
            raise
        return _PostgresClaim(conn, record["id"], self._lock_key)

    def _fail_orphans(self, conn: Any) -> None:
        conn.execute(
            "UPDATE mpo_fit_jobs SET state = 'failed', error = %s, finished_at = %s "
            "WHERE state = ANY(%s)",
            (OWNER_DIED, time.time(), list(ACTIVE_STATES)),
        )

    def _reap(self, conn: Any) -> None:
        """Active records while nobody holds the slot: their owner died; mark them failed."""
        row = conn.execute(_TRY_LOCK, self._lock_key).fetchone()
        if row and row[0]:
            try:
                self._fail_orphans(conn)
            finally:
                conn.execute(_UNLOCK, self._lock_key)

    def update(self, job_id: str, fields: Record) -> None:
        row = _encode(fields)
        assignments = ", ".join(f"{k} = %s" for k in row)
        self._run(
            lambda c: c.execute(
                f"UPDATE mpo_fit_jobs SET {assignments} WHERE id = %s", (*row.values(), job_id)
            )
        )

    def _select(self, conn: Any, where: str, params: tuple[Any, ...]) -> list[Record]:
        cursor = conn.execute(f"SELECT {', '.join(FIELDS)} FROM mpo_fit_jobs {where}", params)
        return [_decode(dict(zip(FIELDS, r))) for r in cursor.fetchall()]

    def get(self, job_id: str) -> Record | None:
        def work(conn: Any) -> Record | None:
            found = self._select(conn, "WHERE id = %s", (job_id,))
            if found and found[0]["state"] in ACTIVE_STATES and found[0]["owner"] != self.owner:
                self._reap(conn)
                found = self._select(conn, "WHERE id = %s", (job_id,))
            return found[0] if found else None

        return self._run(work)  # type: ignore[no-any-return]

    def list(self, limit: int) -> list[Record]:
        def work(conn: Any) -> list[Record]:
            self._reap(conn)
            return self._select(conn, "ORDER BY created_at DESC LIMIT %s", (limit,))

        return self._run(work)  # type: ignore[no-any-return]

    def request_cancel(self, job_id: str) -> Record | None:
        def work(conn: Any) -> None:
            with conn.transaction():
                conn.execute(
                    "UPDATE mpo_fit_jobs SET cancel_requested = true "
                    "WHERE id = %s AND state = ANY(%s)",
                    (job_id, list(ACTIVE_STATES)),
                )
                conn.execute("SELECT pg_notify(%s, %s)", (CANCEL_CHANNEL, job_id))

        self._run(work)
        return self.get(job_id)

    def close(self) -> None:
        """The pool is the profile store's; it closes it."""

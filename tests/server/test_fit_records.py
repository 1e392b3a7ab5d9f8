"""Fit-job records in the store: one fit at a time, cancels that reach the owner, dead owners.

Two ``PostgresProfileStore`` objects in one process hold two database sessions, which is what
the advisory lock and LISTEN/NOTIFY see of two replicas; the two-process test is in
``test_fit_replicas.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from postgres_helpers import fresh_schema, postgres_url

from server.store import SQLiteProfileStore
from server.store.fit_records import OWNER_DIED, SQLiteFitRecords, open_fit_records


def _record(job_id: str, state: str = "queued") -> dict:
    return {"id": job_id, "state": state, "progress": 0.0, "phase_progress": 0.0,
            "created_at": time.time(), "started_at": None, "finished_at": None,
            "request": {"prompts": ["hi"]}, "error": None, "weights": None, "profile": None,
            "report": None}  # fmt: skip


def test_sqlite_one_fit_at_a_time_and_a_restart_fails_the_running_job(tmp_path: Path) -> None:
    store = SQLiteProfileStore(tmp_path / "p.sqlite3")
    records = open_fit_records(store)
    assert isinstance(records, SQLiteFitRecords)
    claim = records.claim(_record("one"))
    assert claim is not None
    assert records.claim(_record("two")) is None  # the slot is taken
    records.update("one", {"state": "sampling", "progress": 0.3, "weights": {"a": 1.0}})
    got = records.get("one")
    assert got is not None and got["state"] == "sampling" and got["weights"] == {"a": 1.0}
    assert got["owner"] == records.owner and got["request"] == {"prompts": ["hi"]}
    cancelled = records.request_cancel("one")
    assert cancelled is not None and cancelled["cancel_requested"] and claim.cancelled.is_set()
    assert records.request_cancel("nope") is None
    # a new process opening the same file: the old owner is gone, its active job failed
    later = open_fit_records(SQLiteProfileStore(tmp_path / "p.sqlite3"))
    failed = later.get("one")
    assert failed is not None and failed["state"] == "failed" and failed["error"] == OWNER_DIED
    claim.release()
    assert records.claim(_record("three")) is not None
    assert [r["id"] for r in later.list(10)] == ["three", "one"]


@pytest.fixture
def two_replicas():
    from server.store.postgres import PostgresProfileStore

    with fresh_schema(postgres_url()) as url:
        stores = [PostgresProfileStore(url), PostgresProfileStore(url)]
        try:
            yield [open_fit_records(s) for s in stores]
        finally:
            for store in stores:
                store.close()


def test_postgres_slot_is_cluster_wide_and_cancels_reach_the_owner(two_replicas) -> None:
    a, b = two_replicas
    assert a.owner != b.owner
    claim = a.claim(_record("job-a"))
    assert claim is not None
    assert b.claim(_record("job-b")) is None  # one fit at a time across replicas
    a.update("job-a", {"state": "scoring", "progress": 0.8})
    seen = b.get("job-a")
    assert seen is not None and seen["state"] == "scoring" and seen["owner"] == a.owner
    assert b.request_cancel("job-a")["cancel_requested"] is True
    assert claim.cancelled.wait(10)  # NOTIFY reached the owner's listening connection
    a.update("job-a", {"state": "cancelled"})
    claim.release()
    again = b.claim(_record("job-b"))
    assert again is not None  # the slot is free once the owner released it
    again.release()


def test_postgres_job_of_a_dead_owner_reads_failed(two_replicas) -> None:
    a, b = two_replicas
    claim = a.claim(_record("job-a"))
    assert claim is not None
    assert b.get("job-a")["state"] == "queued"  # the owner holds the slot: alive
    claim._conn.close()  # the owner's session ends as when its process dies
    claim._thread.join(5)
    failed = b.get("job-a")
    assert failed is not None and failed["state"] == "failed" and failed["error"] == OWNER_DIED
    assert b.claim(_record("job-b")) is not None


def test_postgres_replicas_starting_together_create_the_table_once() -> None:
    """Replicas start at once: concurrent CREATE TABLE IF NOT EXISTS on an empty schema raced
    on PostgreSQL's catalog (a unique violation in pg_type) and one replica failed to start."""
    import threading

    from server.store.postgres import PostgresProfileStore

    with fresh_schema(postgres_url()) as url:
        stores = [PostgresProfileStore(url) for _ in range(6)]
        go = threading.Barrier(len(stores))
        errors: list[BaseException] = []

        def open_records(store: PostgresProfileStore) -> None:
            go.wait()
            try:
                open_fit_records(store)
            except BaseException as exc:  # collected: the assertion below names it
                errors.append(exc)

        threads = [threading.Thread(target=open_records, args=(s,)) for s in stores]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for store in stores:
                store.close()
        assert errors == []

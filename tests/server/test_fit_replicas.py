"""Fit jobs across two ``mpo serve`` processes sharing one PostgreSQL store: a job started on
one is read and cancelled on the other, one fit runs at a time across both, and a job whose
process died reads failed."""

from __future__ import annotations

import signal

import pytest
from postgres_helpers import wait_until
from test_store_postgres_replicas import ADMIN, Replica, replicas  # noqa: F401  (fixture)

from server.store.fit_records import OWNER_DIED

pytestmark = pytest.mark.slow

# Long enough that it is still running when the test acts on it (the test cancels or kills it)
LONG_FIT = {
    "prompts": [f"Tell me about topic number {i}." for i in range(2000)],
    "samples_per_prompt": 16,
    "max_new_tokens": 64,
    "iterations": 10,
    "profile": "never-stored",
}


def job(replica: Replica, job_id: str) -> dict:
    response = replica.http.get(f"/admin/fit/{job_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def start(replica: Replica) -> dict:
    response = replica.http.post("/admin/fit", json=LONG_FIT, headers=ADMIN)
    assert response.status_code == 202, response.text
    return response.json()


def test_a_fit_is_seen_and_cancelled_from_the_other_replica(
    replicas: tuple[Replica, Replica, str],  # noqa: F811
) -> None:
    a, b, _ = replicas
    started = start(a)
    job_id = started["id"]
    wait_until(lambda: job(b, job_id)["state"] == "sampling", timeout=120, interval=0.1)
    seen = job(b, job_id)
    assert seen["owner"] == started["owner"] and seen["request"]["profile"] == "never-stored"
    conflict = b.http.post("/admin/fit", json=LONG_FIT, headers=ADMIN)
    assert conflict.status_code == 409, conflict.text
    assert job_id in conflict.json()["error"]["message"]
    assert [j["id"] for j in b.http.get("/admin/fit", headers=ADMIN).json()["jobs"]] == [job_id]

    cancelled = b.http.delete(f"/admin/fit/{job_id}", headers=ADMIN)
    assert cancelled.status_code == 200, cancelled.text
    wait_until(lambda: job(b, job_id)["state"] == "cancelled", timeout=60, interval=0.1)
    assert job(a, job_id)["state"] == "cancelled"
    assert b.profile("never-stored") is None and a.profile("never-stored") is None

    # the owner dies mid-fit: the other replica reads the job failed and may start one
    second = start(a)
    wait_until(lambda: job(b, second["id"])["state"] == "sampling", timeout=120, interval=0.1)
    a.process.send_signal(signal.SIGKILL)
    a.process.wait(timeout=30)
    wait_until(lambda: job(b, second["id"])["state"] == "failed", timeout=30, interval=0.1)
    assert job(b, second["id"])["error"] == OWNER_DIED
    third = start(b)
    assert third["owner"] != second["owner"]
    assert b.http.delete(f"/admin/fit/{third['id']}", headers=ADMIN).status_code == 200
    wait_until(lambda: job(b, third["id"])["state"] == "cancelled", timeout=60, interval=0.1)

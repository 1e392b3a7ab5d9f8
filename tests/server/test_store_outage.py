"""Profile store outages never stall serving (issue 31, docs/deploy.md "Profile store
outages"): profile reads run off the event loop; while the store is down a replica answers
the profiles it served from its cache, concurrently, within the staleness bound; a
never-read profile and admin writes get 503 at once; ``/health`` answers and says so.

The first tests put a switch in front of the real SQLite backend (down, or a read held
open); the last stops a real PostgreSQL cluster of its own (``pg_ctl``) mid-run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from postgres_helpers import free_port, require_psycopg, unavailable, wait_until
from server_helpers import ADMIN, ADMIN_TOKEN, ClientFactory, assert_error

from server.store import GuardedStore, ProfileStore, ProfileVersion, StoreUnavailable

HANG_S = 20  # only catches a hang; nothing here depends on durations
GEN: dict[str, Any] = {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}
WEIGHTS = {"p": {"helpful": 0.2, "harmless": 0.3, "concise": 0.5}, "q": {"concise": 1.0}}


class Switch:
    """A backend in front of the real one: ``down`` makes every call fail as an unreachable
    database does; ``hold`` makes ``get`` wait (a read stuck on the network) until released."""

    def __init__(self, backend: ProfileStore) -> None:
        self.backend = backend
        self.family = backend.family
        self.down = False
        self.held = threading.Event()  # a get is waiting
        self._release: threading.Event | None = None

    def hold(self) -> threading.Event:
        self._release = threading.Event()
        return self._release

    def _call(self, method: str, *args: Any) -> Any:
        if self.down:
            raise StoreUnavailable("the profile database at switch.test is unreachable")
        return getattr(self.backend, method)(*args)

    def get(self, name: str, version: int | None = None) -> ProfileVersion:
        release = self._release
        if release is not None:
            self.held.set()
            release.wait(HANG_S)
        result: ProfileVersion = self._call("get", name, version)
        return result

    def close(self) -> None:
        self.backend.close()

    def __getattr__(self, method: str) -> Callable[..., Any]:
        return lambda *args: self._call(method, *args)


def _switched(client: TestClient) -> tuple[GuardedStore, Switch]:
    guard = client.app.state.store  # type: ignore[attr-defined]
    assert isinstance(guard, GuardedStore)
    switch = Switch(guard.backend)
    guard.backend = switch
    return guard, switch


def _profile_request(client: TestClient, profile: str | None) -> Any:
    params = {**GEN["parameters"], **({"profile": profile} if profile else {})}
    return client.post("/generate", json={**GEN, "parameters": params})


def _serve_once(client: TestClient) -> dict[str | None, dict[str, Any]]:
    """Store p (the default) and q, and serve each once: what this replica has read."""
    for name, weights in WEIGHTS.items():
        body = {"weights": weights, "default": name == "p"}
        assert client.put(f"/admin/profiles/{name}", json=body, headers=ADMIN).status_code == 201
    served = {}
    for profile in (None, "q"):
        reply = _profile_request(client, profile)
        assert reply.status_code == 200, reply.text
        served[profile] = reply.json()["mixing"]
    assert served[None]["profile"] == "p" and served["q"]["profile"] == "q"
    return served


def _check_outage(client: TestClient, served: dict[str | None, dict[str, Any]]) -> None:
    """What a replica answers while its store is down (the same for every backend)."""
    plan = [None] * 8 + ["q"] * 4  # default-profile and named requests, all at once
    with ThreadPoolExecutor(len(plan)) as pool:
        futures = [pool.submit(_profile_request, client, profile) for profile in plan]
        replies = [future.result(timeout=HANG_S) for future in futures]
    for profile, reply in zip(plan, replies, strict=True):
        assert reply.status_code == 200, reply.text
        assert reply.json()["mixing"] == served[profile]  # the cached weights and name
        assert reply.headers["x-mpo-profile"] == served[profile]["profile"]

    health = client.get("/health")
    assert health.status_code == 200
    store = health.json()["store"]
    assert store["state"] == "down" and "unreachable" in store["error"]

    ghost = _profile_request(client, "ghost")  # never read by this replica
    error = assert_error(ghost, 503, text="has not read it")
    assert error["code"] == "store_unavailable" and ghost.headers["retry-after"]
    write = client.put("/admin/profiles/r", json={"weights": [1, 1, 1]}, headers=ADMIN)
    assert assert_error(write, 503, text="unreachable")["code"] == "store_unavailable"
    explicit = client.post(
        "/generate", json={**GEN, "parameters": {"max_new_tokens": 1, "weights": [1, 0, 0]}}
    )
    assert explicit.status_code == 200, explicit.text


def _store_state(client: TestClient) -> str:
    state: str = client.get("/health").json()["store"]["state"]
    return state


def test_health_and_other_requests_answer_while_a_profile_read_is_stuck(
    make_client: ClientFactory,
) -> None:
    client = make_client(admin_token=ADMIN_TOKEN)
    client.put("/admin/profiles/p", json={"weights": WEIGHTS["p"]}, headers=ADMIN)
    _, switch = _switched(client)
    release = switch.hold()
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(_profile_request, client, "p")
        assert switch.held.wait(HANG_S)  # the profile read is in the store now, and stays
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["store"] == {"state": "up"}
        explicit = client.post(
            "/generate", json={**GEN, "parameters": {"max_new_tokens": 1, "weights": [0, 1, 0]}}
        )
        assert explicit.status_code == 200, explicit.text
        assert not stuck.done()  # both answered while the read was still held
        release.set()
        reply = stuck.result(timeout=HANG_S)
    assert reply.status_code == 200, reply.text
    assert reply.json()["mixing"]["profile"] == "p"


def test_an_outage_answers_served_profiles_from_the_cache(make_client: ClientFactory) -> None:
    client = make_client(admin_token=ADMIN_TOKEN, store_probe_interval_s=0.05)
    served = _serve_once(client)
    guard, switch = _switched(client)
    switch.down = True
    _check_outage(client, served)
    assert guard.outages == 1  # the first failed read opened the outage; the rest skipped it
    switch.down = False
    wait_until(lambda: _store_state(client) == "up", timeout=20, interval=0.02)
    created = client.put("/admin/profiles/r", json={"weights": [1, 1, 1]}, headers=ADMIN)
    assert created.status_code == 201, created.text
    assert _profile_request(client, "r").json()["mixing"]["profile"] == "r"


def test_cached_answers_end_at_the_staleness_bound(make_client: ClientFactory) -> None:
    client = make_client(admin_token=ADMIN_TOKEN, store_max_stale_s=0)  # nothing is fresh
    _serve_once(client)
    _, switch = _switched(client)
    switch.down = True
    for profile in (None, "q"):
        error = assert_error(_profile_request(client, profile), 503, text="in the last 0 s")
        assert error["code"] == "store_unavailable"


# ---- a real PostgreSQL, stopped mid-run ---------------------------------------------------


def _pg_bindir() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_ctl").is_file():
            return candidate
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


class Cluster:
    """A throwaway PostgreSQL cluster this test alone starts and stops (``pg_ctl``)."""

    def __init__(self, base: Path) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            unavailable("PostgreSQL's pg_ctl is not installed (.ci/services.sh installs it)")
        assert bindir is not None
        self.bindir, self.base, self.port = bindir, base, free_port()
        self.data = base / "data"
        self._as_owner: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run as the postgres user, as CI does
            self._as_owner = ["runuser", "-u", "postgres", "--"]
            shutil.chown(base, "postgres")
        self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: object) -> None:
        command = [*self._as_owner, str(self.bindir / tool), *map(str, args)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{tool} failed: {done.stdout}{done.stderr}"

    def start(self) -> None:
        options = f"-p {self.port} -h 127.0.0.1 -k {self.base} -c fsync=off"
        self._run("pg_ctl", "-D", self.data, "-l", self.base / "log", "-w", "-o", options, "start")

    def stop(self) -> None:
        """Returns once the server has shut down (``-m fast``: connections are cut)."""
        self._run("pg_ctl", "-D", self.data, "-w", "-m", "fast", "stop")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    require_psycopg()
    # under /tmp itself: pytest's tmp folders are private to this user, the server is not
    base = Path(tempfile.mkdtemp(prefix="mpo-outage-pg-"))
    try:
        made = Cluster(base)
        made.start()
        try:
            yield made
        finally:
            if (made.data / "postmaster.pid").exists():
                made.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow  # starts its own PostgreSQL server
def test_a_stopped_postgres_never_stalls_serving(
    make_client: ClientFactory, cluster: Cluster
) -> None:
    client = make_client(admin_token=ADMIN_TOKEN, store_url=cluster.url, store_probe_interval_s=0.1)
    served = _serve_once(client)
    cluster.stop()
    _check_outage(client, served)
    assert client.app.state.store.outages == 1  # type: ignore[attr-defined]
    cluster.start()
    wait_until(lambda: _store_state(client) == "up", timeout=30, interval=0.05)
    created = client.put("/admin/profiles/r", json={"weights": [1, 1, 1]}, headers=ADMIN)
    assert created.status_code == 201, created.text
    reply = _profile_request(client, "r")
    assert reply.status_code == 200 and reply.json()["mixing"]["profile"] == "r"

"""Two ``mpo serve`` processes on loopback sharing one PostgreSQL store: a change made
through one (or by a fit job writing to the store) shows on the other within a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from postgres_helpers import free_port, fresh_schema, postgres_url, wait_until

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "replica-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PROPAGATION_LIMIT_S = 1.0

pytestmark = pytest.mark.slow


class Replica:
    """One server process and an HTTP client for it."""

    def __init__(self, name: str, config: Path, store_url: str, folder: Path) -> None:
        self.port = free_port()
        self.log = folder / f"{name}.log"
        env = {
            **os.environ,
            "MPO_ADMIN_TOKEN": TOKEN,
            "MPO_STORE_URL": store_url,
            "MPO_HOME": str(folder / f"{name}-home"),
            "PYTHONPATH": str(ROOT),
        }
        command = [sys.executable, "-m", "server", "serve", "--config", str(config)]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10.0)

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def profile(self, name: str) -> dict[str, Any] | None:
        response = self.http.get(f"/admin/profiles/{name}", headers=ADMIN)
        assert response.status_code in (200, 404), response.text
        return response.json() if response.status_code == 200 else None

    def model_ids(self) -> list[str]:
        response = self.http.get("/v1/models")
        assert response.status_code == 200, response.text
        return [m["id"] for m in response.json()["data"]]

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def replicas(tiny_yaml: Path, tmp_path: Path) -> Iterator[tuple[Replica, Replica, str]]:
    with fresh_schema(postgres_url()) as store_url:
        pair = [Replica(n, tiny_yaml, store_url, tmp_path) for n in ("a", "b")]
        try:
            for replica in pair:
                replica.wait_ready()
            yield pair[0], pair[1], store_url
        finally:
            for replica in pair:
                replica.stop()


TIMES: list[float] = []  # shown with `pytest -s`


def propagation_time(check: Any) -> float:
    seconds = wait_until(check, timeout=5 * PROPAGATION_LIMIT_S)
    assert seconds < PROPAGATION_LIMIT_S, f"took {seconds:.3f} s"
    TIMES.append(seconds)
    return seconds


def test_changes_on_one_replica_reach_the_other_within_a_second(
    replicas: tuple[Replica, Replica, str],
) -> None:
    a, b, store_url = replicas
    served = b.model_ids()[0]
    policies = a.http.get("/info").json()["policies"]
    weights = {name: float(i + 1) for i, name in enumerate(policies)}
    assert b.profile("shared") is None  # b has now read (and cached) its absence

    created = a.http.put("/admin/profiles/shared", json={"weights": weights}, headers=ADMIN)
    assert created.status_code == 201, created.text
    propagation_time(lambda: (b.profile("shared") or {}).get("version") == 1)
    assert f"{served}:shared" in b.model_ids()
    assert b.profile("shared")["weights"] == created.json()["weights"]  # type: ignore[index]

    one_hot = [1.0] + [0.0] * (len(policies) - 1)  # weights as a list, in policy order
    again = a.http.put("/admin/profiles/shared", json={"weights": one_hot}, headers=ADMIN)
    assert again.status_code == 200, again.text
    propagation_time(lambda: (b.profile("shared") or {}).get("version") == 2)

    default = a.http.put("/admin/profiles", json={"default": "shared"}, headers=ADMIN)
    assert default.status_code == 200, default.text
    propagation_time(lambda: b.http.get("/info").json()["default_profile"] == "shared")

    # a fit job (or `mpo fit --save`) writes straight to the store, on whichever replica
    from server.store import Family, open_store

    fit_store = open_store(store_url, Family.of(served, policies))  # the replicas' family
    try:
        fit_store.put("shared", {policies[-1]: 1.0}, meta={"source": "fit job"})
    finally:
        fit_store.close()
    propagation_time(lambda: (a.profile("shared") or {}).get("version") == 3)
    propagation_time(lambda: (b.profile("shared") or {}).get("version") == 3)
    assert b.profile("shared")["meta"] == {"source": "fit job"}  # type: ignore[index]

    rollback = b.http.put("/admin/profiles/shared", json={"version": 1}, headers=ADMIN)
    assert rollback.status_code == 200, rollback.text
    propagation_time(lambda: (a.profile("shared") or {}).get("version") == 4)
    assert a.profile("shared")["weights"] == created.json()["weights"]  # type: ignore[index]

    deleted = a.http.delete("/admin/profiles/shared", headers=ADMIN)
    assert deleted.status_code == 200, deleted.text
    propagation_time(lambda: b.profile("shared") is None)
    assert f"{served}:shared" not in b.model_ids()
    assert b.http.get("/info").json()["default_profile"] is None
    print("propagation seconds:", " ".join(f"{t:.3f}" for t in TIMES))

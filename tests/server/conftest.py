"""Server fixtures: one tiny policy family and one engine for the whole session.

Apps are cheap (a FastAPI object and a SQLite file), so each test gets a fresh one over
the shared engine; ``make_client`` builds variants (auth on, other limits).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from mpo_core.config import load_config
from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.models.policies import PolicySet
from mpo_core.runners import load_policy_set
from mpo_core.testing.families import make_tiny_family
from server.app import create_app
from server.settings import Settings

# --import-mode=importlib does not put test folders on sys.path; the tests share helpers.
sys.path.insert(0, str(Path(__file__).parent))

# The models are tiny: one intra-op thread is faster than two on a shared 2-core machine,
# where OpenMP threads spin against each other (measured: ~20x per decode step).
torch.set_num_threads(1)

from postgres_helpers import fresh_schema, postgres_url  # noqa: E402
from server_helpers import ADMIN_TOKEN, ClientFactory  # noqa: E402

from server.store import ProfileStore, SQLiteProfileStore  # noqa: E402


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProfileStore]:
    """The profile store on every backend: SQLite, and PostgreSQL in a new, empty schema
    (skipped without a test database, failing under CI; postgres_helpers)."""
    if request.param == "sqlite":
        backend: ProfileStore = SQLiteProfileStore(tmp_path / "profiles.sqlite3")
        yield backend
        backend.close()
        return
    assert request.param == "postgres", request.param
    with fresh_schema(postgres_url()) as url:
        from server.store.postgres import PostgresProfileStore

        request.node.pg_url = url  # for test_store.py's write_raw
        backend = PostgresProfileStore(url)
        yield backend
        backend.close()


@pytest.fixture(scope="session")
def tiny_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_family(tmp_path_factory.mktemp("family"), num_policies=3, seed=0)


@pytest.fixture(scope="session")
def policy_set(tiny_yaml: Path) -> PolicySet:
    return load_policy_set(load_config(tiny_yaml))


@pytest.fixture(scope="session")
def engine(policy_set: PolicySet) -> Iterator[Engine]:
    engine = Engine(policy_set, EngineLimits(max_running=8, max_queued=32)).start()
    yield engine
    engine.stop(timeout=5)


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"home": tmp_path / "home", "data_dir": tmp_path / "data"}
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
def make_client(engine: Engine, make_settings: Callable[..., Settings]) -> Iterator[ClientFactory]:
    """``make_client(engine=..., **settings)``: a started TestClient (httpx) over a new app."""
    clients: list[TestClient] = []

    def build(engine_override: Engine | None = None, **overrides: Any) -> TestClient:
        app = create_app(make_settings(**overrides), engine=engine_override or engine)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()  # runs the lifespan
        clients.append(client)
        return client

    yield build
    for client in clients:
        if client.portal is not None:  # not already shut down by the test
            client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    return make_client()


@pytest.fixture
def admin_client(make_client: ClientFactory) -> TestClient:
    return make_client(admin_token=ADMIN_TOKEN)

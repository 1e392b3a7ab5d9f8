"""The PostgreSQL profile store: the shared contract of ``test_store.py``, then what only a
shared store does (cross-process versions, propagation, reconnects, outages).

The contract's tests are loaded from ``test_store.py`` by path and collected here again
with this module's ``store`` fixture (a PostgresProfileStore on a fresh schema), so both
backends run the very same functions.
"""

from __future__ import annotations

import importlib.util
import inspect
import multiprocessing as mp
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from postgres_helpers import (
    TcpProxy,
    free_port,
    fresh_schema,
    postgres_url,
    require_psycopg,
    sql,
    wait_until,
)

from mpo_core.errors import ConfigError, UnknownProfile
from server.store import ProfileStore, SQLiteProfileStore, open_store


def _shared_contract() -> dict[str, Callable[..., Any]]:
    """The ``test_*`` functions of test_store.py that take the ``store`` fixture."""
    path = Path(__file__).with_name("test_store.py")
    spec = importlib.util.spec_from_file_location("_shared_store_contract", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {
        name: func
        for name, func in vars(module).items()
        if name.startswith("test_")
        and inspect.isfunction(func)
        and "store" in inspect.signature(func).parameters
    }


SHARED_TESTS = _shared_contract()
globals().update(SHARED_TESTS)  # pytest collects them here, with the fixture below


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL whose search_path selects a new, empty schema."""
    with fresh_schema(postgres_url()) as url:
        yield url


@pytest.fixture
def store(pg_url: str) -> Iterator[ProfileStore]:
    from server.store.postgres import PostgresProfileStore

    backend = PostgresProfileStore(pg_url)
    yield backend
    backend.close()


@pytest.fixture
def write_raw(store: Any, pg_url: str) -> Callable[[str, int, str, str], None]:
    """Write a row unchecked (as an older version or hand-run SQL could have), then send
    the NOTIFY that docs/deploy.md asks of manual SQL."""

    def write(name: str, version: int, weights: str, meta: str) -> None:
        seen = store.listener_status()["notifications"]
        sql(
            pg_url,
            "INSERT INTO mpo_profile_versions (name, version, weights, strength, meta, "
            "created_at) VALUES (%s, %s, %s::json, 1.0, %s::json, 0)",
            (name, version, weights, meta),
        )
        sql(pg_url, "NOTIFY mpo_profiles")
        wait_until(lambda: store.listener_status()["notifications"] > seen, timeout=10)

    return write


def test_the_shared_contract_is_collected_here() -> None:
    assert {
        "test_put_creates_versions_and_get_returns_latest",
        "test_delete_keeps_history_and_versions_are_never_reused",
        "test_rollback_is_a_put_of_old_content",
        "test_concurrent_threads_get_distinct_versions",
    } <= set(SHARED_TESTS)
    assert "test_sqlite_persists_across_reopen" not in SHARED_TESTS  # backend-specific


# ---- same observable results as SQLite -------------------------------------------------


def test_names_sort_bytewise_like_sqlite(store: ProfileStore, tmp_path: Path) -> None:
    """.ci/services.sh makes the test database's collation ICU en-US, which sorts otherwise."""
    names = ["b", "B", "a", "A", "0", "b-1", "b.1", "b_1", "Z9"]
    lite = SQLiteProfileStore(tmp_path / "order.sqlite3")
    for name in names:
        store.put(name, {"x": 1.0})
        lite.put(name, {"x": 1.0})
    assert [p.name for p in store.list()] == [p.name for p in lite.list()] == sorted(names)


def test_weights_keep_their_key_order(store: ProfileStore) -> None:
    store.put("p", {"zeta": 0.5, "alpha": 0.25, "mid": 0.25}, meta={"z": 1, "a": 2})
    got = store.get("p")
    assert list(got.weights) == ["zeta", "alpha", "mid"]
    assert list(got.meta) == ["z", "a"]
    assert got.weights == {"zeta": 0.5, "alpha": 0.25, "mid": 0.25}


def test_open_store_dispatches_postgres_urls(pg_url: str) -> None:
    from server.store.postgres import PostgresProfileStore

    for scheme in ("postgresql", "postgres"):
        url = scheme + pg_url[len("postgresql") :]
        backend = open_store(url)
        try:
            assert isinstance(backend, PostgresProfileStore)
            backend.put("x", {"a": 1.0})
        finally:
            backend.close()
    again = open_store(pg_url)
    assert again.get("x").version == 2  # one database behind both URLs
    again.close()


def test_missing_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # None in sys.modules: ImportError
    monkeypatch.delitem(sys.modules, "server.store.postgres", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'mpo-server\[postgres\]'"):
        open_store("postgresql://db.example/profiles")


def test_unreachable_database_is_a_clear_error() -> None:
    require_psycopg()
    from server.store.postgres import StoreUnavailable

    url = f"postgresql://nobody:s3cret@127.0.0.1:{free_port()}/none?connect_timeout=2"
    with pytest.raises(StoreUnavailable, match="cannot open the profile store") as info:
        open_store(url)
    assert "s3cret" not in str(info.value)  # credentials stay out of messages
    with pytest.raises(ConfigError, match="invalid PostgreSQL"):
        open_store("postgresql://db.example/profiles?bogus=1")


# ---- several writers, several readers ---------------------------------------------------


def _process_writer(url: str, worker: int, count: int) -> None:
    from server.store.postgres import PostgresProfileStore

    backend = PostgresProfileStore(url, cache=False)
    for j in range(count):
        backend.put("shared", {"x": float(worker * 1000 + j + 1)}, meta={"worker": worker})
    backend.close()


def test_concurrent_processes_get_consecutive_versions(store: ProfileStore, pg_url: str) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_process_writer, args=(pg_url, w, 10)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    history = store.history("shared")
    assert [v.version for v in history] == list(range(1, 31))
    assert sorted(v.meta["worker"] for v in history) == sorted([0, 1, 2] * 10)


def test_a_second_store_sees_every_change_within_a_second(pg_url: str) -> None:
    from server.store.postgres import PostgresProfileStore

    writer, reader = PostgresProfileStore(pg_url), PostgresProfileStore(pg_url)
    try:
        assert reader.list() == [] and reader.get_default() is None  # now cached
        with pytest.raises(UnknownProfile):
            reader.get("p")
        writer.put("p", {"a": 1.0})
        assert wait_until(lambda: [p.version for p in reader.list()] == [1], 1.0) < 1.0
        assert reader.get("p").version == 1
        writer.put("p", {"a": 2.0})
        assert wait_until(lambda: reader.get("p").weights == {"a": 2.0}, 1.0) < 1.0
        writer.set_default("p")
        assert wait_until(lambda: reader.get_default() == "p", 1.0) < 1.0
        writer.delete("p")
        assert wait_until(lambda: reader.list() == [], 1.0) < 1.0
        assert reader.get_default() is None
        assert [v.version for v in reader.history("p")] == [1, 2]
    finally:
        writer.close()
        reader.close()


# ---- the cache: notifications, reconnects, outages --------------------------------------


def _insert_behind_its_back(url: str, name: str, version: int, weights: str) -> None:
    sql(
        url,
        "INSERT INTO mpo_profile_versions (name, version, weights, created_at) "
        "VALUES (%s, %s, %s::json, %s)",
        (name, version, weights, time.time()),
    )


def _settle(store: Any, writes: int, before: int) -> None:
    """Wait until the store's listener has handled the notifications of its own writes."""
    wait_until(lambda: store.listener_status()["notifications"] >= before + writes, 5.0)


def test_reconnect_drops_the_whole_cache(store: Any, pg_url: str) -> None:
    before = store.listener_status()["notifications"]
    store.put("p", {"a": 1.0})
    _settle(store, 1, before)
    assert store.get("p").version == 1  # cached
    _insert_behind_its_back(pg_url, "p", 2, '{"a": 2.0}')  # no NOTIFY: a missed change
    assert store.get("p").version == 1  # served from the cache, as designed
    status = store.listener_status()
    killed = sql(
        pg_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (status["application_name"],),
    )
    assert killed == [(True,)]
    wait_until(lambda: store.listener_status()["connections"] == 2, 10.0, 0.02)
    assert store.listener_status()["listening"]
    assert store.get("p").version == 2


def test_manual_notify_drops_the_cache(store: Any, pg_url: str) -> None:
    before = store.listener_status()["notifications"]
    store.put("p", {"a": 1.0})
    _settle(store, 1, before)
    assert store.get("p").version == 1
    _insert_behind_its_back(pg_url, "p", 2, '{"a": 2.0}')
    assert store.get("p").version == 1  # cached: the insert sent no notification
    sql(pg_url, "NOTIFY mpo_profiles")  # what docs/deploy.md tells admins to run
    wait_until(lambda: store.get("p").version == 2, 1.0)


def test_outage_serves_last_reads_then_recovers(pg_url: str) -> None:
    from server.store.postgres import PostgresProfileStore, StoreUnavailable

    parts = urlsplit(pg_url)
    assert parts.port is not None
    proxy = TcpProxy(parts.port)
    via_proxy = pg_url.replace(f":{parts.port}/", f":{proxy.port}/", 1)
    store = PostgresProfileStore(via_proxy, pool_timeout_s=0.5)
    try:
        before = store.listener_status()["notifications"]
        store.put("p", {"a": 1.0})
        store.set_default("p")
        _settle(store, 2, before)
        assert (store.get("p").version, store.get_default()) == (1, "p")  # cached
        proxy.cut()
        wait_until(lambda: not store.listener_status()["cache_trusted"], 5.0, 0.02)
        assert store.get("p").weights == {"a": 1.0}  # last known value
        assert store.get_default() == "p"
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.get("never-read")
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.put("p", {"a": 3.0})
        _insert_behind_its_back(pg_url, "p", 2, '{"a": 2.0}')  # another replica's write
        proxy.restore()
        wait_until(lambda: store.listener_status()["cache_trusted"], 10.0, 0.02)
        assert store.get("p").weights == {"a": 2.0}  # the reconnect dropped the cache
        assert store.put("p", {"a": 4.0}).version == 3
    finally:
        proxy.cut()
        store.close()

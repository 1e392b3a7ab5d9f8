"""What only the PostgreSQL profile store does: the same observable results as SQLite,
cross-process versions, propagation, reconnects, outages. The contract both backends
share runs from ``test_store.py``, whose ``store`` fixture yields each of them.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections.abc import Iterator
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
        assert [(v.version, v.deleted) for v in reader.history("p")] == [
            (1, False), (2, False), (3, True),
        ]  # fmt: skip
    finally:
        writer.close()
        reader.close()


# ---- the cache: notifications, reconnects, outages --------------------------------------


def _insert_behind_its_back(url: str, name: str, version: int, weights: str) -> None:
    sql(
        url,
        "INSERT INTO mpo_family_profile_versions (family, name, version, weights, created_at) "
        "VALUES ('', %s, %s, %s::json, %s)",  # the UNSCOPED family of the stores here
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


def test_outage_is_store_unavailable_then_recovers(pg_url: str) -> None:
    """The backend answers nothing from its cache while the database is away (serving the
    last reads is ServedProfiles' job, tests/server/test_store_outage.py); a reconnect
    drops the cache, so a write made meanwhile by another replica is seen."""
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
        for read in (lambda: store.get("p"), store.get_default, lambda: store.get("never-read")):
            with pytest.raises(StoreUnavailable, match="unreachable"):
                read()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.put("p", {"a": 3.0})
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.ping()
        _insert_behind_its_back(pg_url, "p", 2, '{"a": 2.0}')  # another replica's write
        proxy.restore()
        wait_until(lambda: store.listener_status()["cache_trusted"], 10.0, 0.02)
        assert store.get("p").weights == {"a": 2.0}  # the reconnect dropped the cache
        assert store.put("p", {"a": 4.0}).version == 3
    finally:
        proxy.cut()
        store.close()

"""The profile store's contract, run against every backend the ``store`` fixture yields:
SQLite, and PostgreSQL when a test database is given (``. .ci/services.sh`` starts one;
without it those tests skip, except under CI where they fail). A new backend joins by
adding a param to ``store`` (conftest.py); what only one backend does is tested in its own file
(``test_store_postgres.py``) or below, named after it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from postgres_helpers import sql, wait_until

from mpo_core.errors import ConfigError, InvalidParameter, UnknownProfile
from server.store import (
    DeletedProfile,
    ProfileStore,
    SQLiteProfileStore,
    UnreadableProfile,
    open_store,
)

WriteRaw = Callable[[str, int, str, str], None]


@pytest.fixture
def write_raw(store: ProfileStore, request: pytest.FixtureRequest) -> WriteRaw:
    """Write a row unchecked, as an older version or hand-run SQL could have written it
    (PostgreSQL: then the NOTIFY that docs/deploy.md asks of manual SQL)."""

    def write_sqlite(name: str, version: int, weights: str, meta: str) -> None:
        assert isinstance(store, SQLiteProfileStore)
        with sqlite3.connect(store.path) as conn:
            conn.execute(
                "INSERT INTO family_profile_versions (family, name, version, weights, "
                "strength, meta, created_at) VALUES (?, ?, ?, ?, 1.0, ?, 0)",
                (store.family.key, name, version, weights, meta),
            )

    def write_postgres(name: str, version: int, weights: str, meta: str) -> None:
        url = request.node.pg_url
        seen = store.listener_status()["notifications"]  # type: ignore[attr-defined]
        sql(
            url,
            "INSERT INTO mpo_family_profile_versions (family, name, version, weights, "
            "strength, meta, created_at) VALUES (%s, %s, %s, %s::json, 1.0, %s::json, 0)",
            (store.family.key, name, version, weights, meta),
        )
        sql(url, "NOTIFY mpo_profiles")
        wait_until(
            lambda: store.listener_status()["notifications"] > seen,  # type: ignore[attr-defined]
            timeout=10,
        )

    return write_sqlite if isinstance(store, SQLiteProfileStore) else write_postgres


def test_store_implements_protocol(store: ProfileStore) -> None:
    assert isinstance(store, ProfileStore)


def test_put_creates_versions_and_get_returns_latest(store: ProfileStore) -> None:
    v1 = store.put("safe", {"helpful": 0.2, "harmless": 0.8}, meta={"by": "test"})
    v2 = store.put("safe", {"helpful": 0.5, "harmless": 0.5}, strength=0.5)
    assert (v1.version, v2.version) == (1, 2)
    current = store.get("safe")
    assert current.version == 2
    assert current.weights == {"helpful": 0.5, "harmless": 0.5}
    assert current.strength == 0.5
    assert store.get("safe", version=1).meta == {"by": "test"}
    assert [v.version for v in store.history("safe")] == [1, 2]


def test_list_is_sorted_current_versions(store: ProfileStore) -> None:
    store.put("b", {"x": 1.0})
    store.put("a", {"x": 1.0})
    store.put("b", {"x": 2.0})
    listed = store.list()
    assert [(p.name, p.version) for p in listed] == [("a", 1), ("b", 2)]


def test_rollback_is_a_put_of_old_content(store: ProfileStore) -> None:
    store.put("p", {"x": 1.0, "y": 0.0})
    store.put("p", {"x": 0.0, "y": 1.0})
    old = store.get("p", version=1)
    v3 = store.put("p", old.weights, old.strength, {"rollback_of": 1})
    assert v3.version == 3
    assert store.get("p").weights == {"x": 1.0, "y": 0.0}
    assert len(store.history("p")) == 3


def test_unknown_profile_and_version(store: ProfileStore) -> None:
    with pytest.raises(UnknownProfile):
        store.get("nope")
    with pytest.raises(UnknownProfile):
        store.history("nope")
    store.put("p", {"x": 1.0})
    with pytest.raises(UnknownProfile):
        store.get("p", version=7)
    with pytest.raises(UnknownProfile):
        store.delete("nope")
    with pytest.raises(UnknownProfile):
        store.set_default("nope")


def test_delete_keeps_history_and_versions_are_never_reused(store: ProfileStore) -> None:
    store.put("p", {"x": 1.0})
    store.set_default("p")
    store.delete("p")
    assert store.list() == []
    assert store.get_default() is None  # the default pointed at it
    with pytest.raises(UnknownProfile):
        store.get("p")
    assert store.get("p", version=1).weights == {"x": 1.0}  # history still readable
    again = store.put("p", {"x": 3.0})
    assert again.version == 3  # 2 was the deletion
    history = store.history("p")
    assert [(v.version, v.deleted) for v in history] == [(1, False), (2, True), (3, False)]


def test_a_deleted_profile_says_so_and_keeps_its_history(store: ProfileStore) -> None:
    for x in (1.0, 2.0, 3.0):
        store.put("p", {"x": x})
    store.delete("p")
    with pytest.raises(DeletedProfile, match="was deleted \\(version 4\\)") as info:
        store.get("p")
    assert info.value.version == 4 and isinstance(info.value, UnknownProfile)
    with pytest.raises(DeletedProfile):
        store.delete("p")  # already deleted
    with pytest.raises(DeletedProfile):
        store.set_default("p")
    with pytest.raises(UnknownProfile, match="the version that deleted it"):
        store.get("p", version=4)
    tombstone = store.history("p")[-1]
    assert (tombstone.version, tombstone.deleted, tombstone.weights) == (4, True, {})
    assert store.get("p", version=2).weights == {"x": 2.0}  # audit reads still work
    assert store.put("p", {"x": 5.0}).version == 5  # re-created, numbering continued
    assert [v.deleted for v in store.history("p")] == [False, False, False, True, False]
    assert store.get("p").version == 5


def test_default_profile(store: ProfileStore) -> None:
    assert store.get_default() is None
    store.put("a", {"x": 1.0})
    store.put("b", {"x": 1.0})
    store.set_default("a")
    store.set_default("b")
    assert store.get_default() == "b"
    store.set_default(None)
    assert store.get_default() is None


@pytest.mark.parametrize(
    ("name", "weights", "strength", "param"),
    [
        ("bad name!", {"x": 1.0}, 1.0, "name"),
        ("p", {}, 1.0, "weights"),
        ("p", {"x": -1.0}, 1.0, "weights"),  # signed, but the sum must be above 0
        ("p", {"x": 1.0, "y": -0.95}, 1.0, "weights.x"),  # 20 once normalised: past 10
        ("p", {"x": float("nan")}, 1.0, "weights.x"),
        ("p", {"x": 0.0}, 1.0, "weights"),
        ("p", {"x": 1.0}, -0.5, "strength"),
    ],
)
def test_put_validates(
    store: ProfileStore, name: str, weights: dict[str, float], strength: float, param: str
) -> None:
    with pytest.raises(InvalidParameter) as info:
        store.put(name, weights, strength)
    assert info.value.param == param
    assert store.list() == []


@pytest.mark.parametrize(
    ("meta", "param"),
    [
        ({"x": "\ud800"}, "meta"),  # a lone surrogate: stored, it would break every reply
        ({"\udfff": 1}, "meta"),
        ({"x": [{"y": "a\udc00b"}]}, "meta"),
        ({"x": float("inf")}, "meta"),
    ],
)
def test_put_refuses_meta_that_no_reply_can_carry(
    store: ProfileStore, meta: dict, param: str
) -> None:
    with pytest.raises(InvalidParameter) as info:
        store.put("poison", {"x": 1.0}, meta=meta)
    assert info.value.param == param
    assert store.list() == []
    with pytest.raises(UnknownProfile):
        store.history("poison")


def test_put_refuses_weight_names_outside_the_name_rule(store: ProfileStore) -> None:
    with pytest.raises(InvalidParameter) as info:
        store.put("p", {"x\n": 1.0})
    assert info.value.param == "weights"
    assert store.list() == []


def test_bad_stored_rows_are_skipped_and_named(
    store: ProfileStore, write_raw: WriteRaw, caplog: pytest.LogCaptureFixture
) -> None:
    store.put("good", {"x": 1.0})
    store.put("mixed", {"x": 1.0})
    write_raw("nl\n", 1, '{"x": 1.0}', "{}")  # a name an older version let through
    write_raw("mixed", 2, '{"x": 1.0}', '{"x": "\\ud800"}')  # a lone surrogate in meta
    write_raw("negative", 1, '{"x": -1.0}', "{}")
    with caplog.at_level(logging.WARNING, logger="server.store.base"):
        listed = store.list()
    assert [p.name for p in listed] == ["good"]  # mixed's current version is unreadable
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "'nl\\n' version 1" in warnings
    assert "'mixed' version 2" in warnings and "surrogate" in warnings
    assert "'negative' version 1" in warnings
    assert [v.version for v in store.history("mixed")] == [1]
    with pytest.raises(UnreadableProfile, match="'mixed' version 2"):
        store.get("mixed")
    assert store.get("mixed", version=1).weights == {"x": 1.0}
    with pytest.raises(UnreadableProfile):
        store.set_default("mixed")  # requests could not read it
    assert store.get_default() is None
    assert store.put("mixed", {"x": 2.0}).version == 3  # a new version replaces it
    assert store.get("mixed").weights == {"x": 2.0}
    store.delete("negative")  # and a delete removes it
    assert [p.name for p in store.list()] == ["good", "mixed"]


def test_concurrent_threads_get_distinct_versions(store: ProfileStore) -> None:
    def writer(i: int) -> None:
        for j in range(10):
            store.put("shared", {"x": float(i * 100 + j + 1)})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = [v.version for v in store.history("shared")]
    assert versions == list(range(1, 41))
    assert len({v.weights["x"] for v in store.history("shared")}) == 40


# ---- SQLite specifics -------------------------------------------------------------------


def _process_writer(path: str, worker: int, count: int) -> None:
    backend = SQLiteProfileStore(path)
    for j in range(count):
        backend.put("shared", {"x": float(worker * 1000 + j + 1)}, meta={"worker": worker})
        backend.put(f"own{worker}", {"x": 1.0})


@pytest.mark.slow  # three spawned processes
def test_sqlite_concurrent_processes_never_corrupt(tmp_path: Path) -> None:
    path = str(tmp_path / "multi.sqlite3")
    SQLiteProfileStore(path)  # create the schema once
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_process_writer, args=(path, w, 15)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    backend = SQLiteProfileStore(path)
    history = backend.history("shared")
    assert [v.version for v in history] == list(range(1, 46))
    assert sorted(v.meta["worker"] for v in history) == sorted([0, 1, 2] * 15)
    assert {p.name: p.version for p in backend.list()} == {
        "own0": 15, "own1": 15, "own2": 15, "shared": 45,
    }  # fmt: skip
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite3"
    first = SQLiteProfileStore(path)
    first.put("keep", {"a": 0.25, "b": 0.75}, strength=0.5)
    first.set_default("keep")
    first.close()
    second = SQLiteProfileStore(path)
    assert second.get("keep").weights == {"a": 0.25, "b": 0.75}
    assert second.get_default() == "keep"


def test_open_store_urls(tmp_path: Path) -> None:
    absolute = open_store(f"sqlite:///{tmp_path / 'u.sqlite3'}")
    assert isinstance(absolute, SQLiteProfileStore)
    assert absolute.path == tmp_path / "u.sqlite3"
    assert isinstance(open_store(str(tmp_path / "bare.sqlite3")), SQLiteProfileStore)
    with pytest.raises(ConfigError, match="mysql"):
        open_store("mysql://db/x")

"""Profiles belong to a family (issue 38, docs/server.md "Profiles and families"): one
store holds several families without one seeing the other's profiles or default; stores
written before families are adopted once by each family they fit; a stored default that
does not fit the loaded policies is a start-up warning, never a 400 on plain requests.
Backend tests run on SQLite and PostgreSQL (skipped without a test database, as in
``test_store.py``)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from postgres_helpers import fresh_schema, postgres_url, sql
from server_helpers import ADMIN, ADMIN_TOKEN, ClientFactory, assert_error

from mpo_core.errors import UnknownProfile
from mpo_core.models.policies import PolicySet
from server import cli
from server.settings import Settings
from server.store import Family, ProfileStore, SQLiteProfileStore

FAMILY_A = Family.of("served-a", ["b", "a", "c"])
FAMILY_X = Family.of("served-x", ["x", "y"])

Open = Callable[[Family], ProfileStore]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(kind, location): one SQLite file, or one fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield "sqlite", str(tmp_path / "profiles.sqlite3")
        return
    with fresh_schema(postgres_url()) as url:
        yield "postgres", url


@pytest.fixture
def open_family(backend: tuple[str, str]) -> Iterator[Open]:
    """Open the one database for a family; every store opened is closed afterwards."""
    kind, location = backend
    opened: list[ProfileStore] = []

    def build(family: Family) -> ProfileStore:
        if kind == "sqlite":
            store: ProfileStore = SQLiteProfileStore(location, family)
        else:
            from server.store.postgres import PostgresProfileStore

            store = PostgresProfileStore(location, family=family)
        opened.append(store)
        return store

    yield build
    for store in opened:
        store.close()


def test_the_key_is_the_served_name_and_the_sorted_policy_names() -> None:
    assert FAMILY_A.key == "served-a/a,b,c"
    assert Family.of("served-a", ["c", "a", "b"]) == Family("served-a/a,b,c", ("c", "a", "b"))
    assert Family.of("served-a", ["a"], key="shared").key == "shared"
    settings = Settings(profile_family="mine")
    assert settings.family("mpo", ["polite"]).key == "mine"


def test_families_do_not_see_each_other(open_family: Open) -> None:
    a, x = open_family(FAMILY_A), open_family(FAMILY_X)
    a.put("p", {"a": 1.0})
    a.put("p", {"b": 1.0})
    a.set_default("p")
    assert x.list() == [] and x.get_default() is None
    with pytest.raises(UnknownProfile):
        x.get("p")
    with pytest.raises(UnknownProfile):
        x.history("p")
    assert x.put("p", {"x": 1.0}).version == 1  # its own numbering
    x.set_default("p")
    x.delete("p")
    assert x.get_default() is None
    assert (a.get("p").version, a.get("p").weights, a.get_default()) == (2, {"b": 1.0}, "p")
    assert [p.name for p in a.list()] == ["p"]


# ---- stores written before families -------------------------------------------------------

# The tables as the schema before families created them (SQLite, then PostgreSQL).
_OLD_SQLITE = """
CREATE TABLE profile_versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, weights TEXT,
    strength REAL NOT NULL DEFAULT 1.0, meta TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE store_settings (key TEXT PRIMARY KEY, value TEXT);
"""
_OLD_POSTGRES = """
CREATE TABLE mpo_profile_versions (
    name text NOT NULL, version integer NOT NULL, weights json,
    strength double precision NOT NULL DEFAULT 1.0, meta json NOT NULL DEFAULT '{}',
    created_at double precision NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE mpo_store_settings (key text PRIMARY KEY, value text);
"""
# name, version, weights (None: a deletion), strength, meta
_OLD_ROWS: list[tuple[str, int, str | None, float, str]] = [
    ("fits", 1, '{"a": 1.0}', 1.0, '{"by": "fit"}'),
    ("fits", 2, '{"a": 0.5, "c": 0.5}', 0.5, "{}"),
    ("other", 1, '{"x": 1.0}', 1.0, "{}"),
    ("mixed", 1, '{"a": 1.0}', 1.0, "{}"),
    ("mixed", 2, '{"x": 1.0}', 1.0, "{}"),  # one version names a policy A lacks
    ("gone", 1, '{"b": 1.0}', 1.0, "{}"),
    ("gone", 2, None, 1.0, "{}"),
]


def _write_old_store(backend: tuple[str, str], default: str) -> Callable[[], int]:
    """The old tables with _OLD_ROWS and ``default``; returns a counter of their rows."""
    kind, location = backend
    rows = [(*row, 1000.0 + i) for i, row in enumerate(_OLD_ROWS)]
    if kind == "sqlite":
        with sqlite3.connect(location) as conn:
            conn.executescript(_OLD_SQLITE)
            conn.executemany("INSERT INTO profile_versions VALUES (?, ?, ?, ?, ?, ?)", rows)
            conn.execute("INSERT INTO store_settings VALUES ('default_profile', ?)", (default,))

        def count() -> int:
            with sqlite3.connect(location) as conn:
                return int(conn.execute("SELECT COUNT(*) FROM profile_versions").fetchone()[0])

        return count
    sql(location, _OLD_POSTGRES)
    for row in rows:
        sql(location, "INSERT INTO mpo_profile_versions VALUES (%s, %s, %s, %s, %s, %s)", row)
    sql(location, "INSERT INTO mpo_store_settings VALUES ('default_profile', %s)", (default,))
    return lambda: int(sql(location, "SELECT COUNT(*) FROM mpo_profile_versions")[0][0])


def test_an_old_store_is_adopted_by_the_families_it_fits(
    backend: tuple[str, str], open_family: Open
) -> None:
    old_rows = _write_old_store(backend, default="fits")
    a = open_family(FAMILY_A)
    assert [p.name for p in a.list()] == ["fits"]  # mixed names x; gone is deleted
    assert a.get_default() == "fits"
    history = a.history("fits")
    assert [(v.version, v.weights, v.strength, v.meta) for v in history] == [
        (1, {"a": 1.0}, 1.0, {"by": "fit"}),
        (2, {"a": 0.5, "c": 0.5}, 0.5, {}),
    ]
    assert [v.created_at for v in history] == [1000.0, 1001.0]  # copied as they were
    assert [(v.version, v.deleted) for v in a.history("gone")] == [(1, False), (2, True)]
    with pytest.raises(UnknownProfile):
        a.get("mixed")

    x = open_family(FAMILY_X)
    assert [p.name for p in x.list()] == ["other"]
    assert x.get_default() is None  # the old default is not one of its profiles
    assert old_rows() == len(_OLD_ROWS)  # the old tables are left as they were

    a.delete("fits")
    again = open_family(FAMILY_A)  # adoption happens once: the delete stands
    assert again.list() == [] and again.get_default() is None
    assert again.put("fits", {"b": 1.0}).version == 4


# ---- through the server ---------------------------------------------------------------------


def _tiny_family(policy_set: PolicySet) -> Family:
    return Settings().family(policy_set.served_name, policy_set.names)


def _plain(client: TestClient) -> Any:
    reply = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}})
    assert reply.status_code == 200, reply.text
    return reply.json()["mixing"]


def test_one_home_serves_two_families_apart(make_client: ClientFactory) -> None:
    first = make_client(admin_token=ADMIN_TOKEN)
    body = {"weights": {"concise": 1.0}, "default": True}
    assert first.put("/admin/profiles/balanced", json=body, headers=ADMIN).status_code == 201
    assert _plain(first)["profile"] == "balanced"

    other = make_client(admin_token=ADMIN_TOKEN, profile_family="another-family")  # same home
    assert other.get("/admin/profiles", headers=ADMIN).json() == {"default": None, "profiles": []}
    assert not [m["id"] for m in other.get("/v1/models").json()["data"] if ":" in m["id"]]
    assert _plain(other)["profile"] is None  # uniform: the other family's default is unseen
    assert_error(
        other.post("/generate", json={"inputs": "Hi", "parameters": {"profile": "balanced"}}),
        404,
        param="profile",
    )
    assert _plain(first)["profile"] == "balanced"  # and the first keeps its own


def test_a_default_that_does_not_fit_is_a_startup_warning_not_a_400(
    make_client: ClientFactory,
    tmp_path: Path,
    policy_set: PolicySet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = SQLiteProfileStore(tmp_path / "data" / "profiles.sqlite3", _tiny_family(policy_set))
    store.put("balanced", {"polite": 0.5, "upbeat": 0.5})  # another family's policy names
    store.set_default("balanced")
    with caplog.at_level(logging.WARNING, logger="server.serving"):
        client = make_client()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("default profile 'balanced' (version 1)" in w for w in warnings), warnings
    assert any("does not fit the loaded policies" in w for w in warnings), warnings

    mixing = _plain(client)  # a request that named no profile: 200, uniform weights
    assert mixing["profile"] is None and len(set(mixing["weights"].values())) == 1
    chat = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert chat.status_code == 200 and chat.json()["mixing"]["profile"] is None
    named = {"inputs": "Hi", "parameters": {"profile": "balanced", "max_new_tokens": 1}}
    assert_error(client.post("/generate", json=named), 400, param="profile", text="does not fit")


def test_a_server_reads_what_mpo_fit_save_stored(
    make_client: ClientFactory,
    tmp_path: Path,
    policy_set: PolicySet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MPO_DATA_DIR", str(tmp_path / "data"))  # where make_client's app looks
    weights = {"helpful": 0.25, "harmless": 0.25, "concise": 0.5}
    cli.save_profile("fitted", weights, 1.0, "mpo fit", policy_set.served_name, policy_set.names)
    client = make_client(admin_token=ADMIN_TOKEN)
    stored = client.get("/admin/profiles/fitted", headers=ADMIN)
    assert stored.status_code == 200, stored.text
    assert stored.json()["meta"] == {"source": "mpo fit"}
    reply = client.post("/generate", json={"inputs": "Hi", "parameters": {"profile": "fitted"}})
    assert reply.status_code == 200 and reply.json()["mixing"]["weights"] == weights

"""Profiles that bring personas (issue 34.2), on every store backend (conftest.py's
``store``): a version keeps the personas it was written with, a bad one is refused before
anything is written, and a store made before profiles held personas gains the column, its
rows bringing none."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from postgres_helpers import fresh_schema, postgres_url, sql

from mpo_core.errors import InvalidParameter
from server.store import ProfileStore, SQLiteProfileStore

OWN = {"teacher": "You are a patient teacher.", "grateful": {"prefix": "Thank you."}}


def test_a_version_keeps_its_personas(store: ProfileStore) -> None:
    first = store.put("tutor", {"brief": 1.0, "teacher": 2.0}, 0.8, {"by": "t"}, OWN)
    assert first.request_personas == OWN
    plain = store.put("tutor", {"brief": 1.0})
    assert plain.request_personas == {}
    assert store.get("tutor").request_personas == {}
    assert store.get("tutor", first.version).request_personas == OWN
    assert store.get("tutor", first.version).to_dict()["personas"] == OWN
    assert [v.request_personas for v in store.history("tutor")] == [OWN, {}]
    store.put("other", {"teacher": 1.0}, personas={"teacher": {"system": "Be kind."}})
    listed = {p.name: p.request_personas for p in store.list()}
    assert listed == {"other": {"teacher": "Be kind."}, "tutor": {}}  # a system text: a string


@pytest.mark.parametrize(
    "personas, param",
    [
        ({"bad name": "x"}, "personas"),
        ({"t": {"system": "a", "prefix": "b"}}, "personas.t"),
        ({"t": ""}, "personas.t.system"),
        ({f"p{i}": "x" for i in range(33)}, "personas"),
    ],
)
def test_bad_personas_write_nothing(store: ProfileStore, personas: object, param: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        store.put("p", {"x": 1.0}, personas=personas)  # type: ignore[arg-type]
    assert caught.value.param == param
    assert store.list() == []


def test_an_sqlite_file_from_before_personas_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:  # the table as it was before this column
        conn.execute(
            "CREATE TABLE family_profile_versions (family TEXT NOT NULL, name TEXT NOT NULL, "
            "version INTEGER NOT NULL, weights TEXT, strength REAL NOT NULL DEFAULT 1.0, "
            "meta TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL, "
            "PRIMARY KEY (family, name, version))"
        )
        conn.execute(
            "INSERT INTO family_profile_versions VALUES ('', 'old', 1, '{\"x\": 1.0}', 1.0, "
            "'{}', 0)"
        )
    store = SQLiteProfileStore(path)
    assert store.get("old").request_personas == {}
    assert store.put("old", {"x": 1.0}, personas=OWN).request_personas == OWN
    assert SQLiteProfileStore(path).get("old").request_personas == OWN  # opened again


def test_a_postgres_table_from_before_personas_gains_the_column() -> None:
    with fresh_schema(postgres_url()) as url:
        sql(
            url,
            "CREATE TABLE mpo_family_profile_versions (family text NOT NULL, name text NOT NULL,"
            " version integer NOT NULL, weights json, strength double precision NOT NULL "
            "DEFAULT 1.0, meta json NOT NULL DEFAULT '{}', created_at double precision NOT "
            "NULL, PRIMARY KEY (family, name, version))",
        )
        sql(
            url,
            "INSERT INTO mpo_family_profile_versions VALUES ('', 'old', 1, '{\"x\": 1.0}', 1.0,"
            " '{}', 0)",
        )
        from server.store.postgres import PostgresProfileStore

        store = PostgresProfileStore(url)
        try:
            assert store.get("old").request_personas == {}
            assert store.put("old", {"x": 1.0}, personas=OWN).request_personas == OWN
        finally:
            store.close()

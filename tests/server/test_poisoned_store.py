"""Names and stored values that once poisoned the profile store, tried through HTTP.

Each refused write must leave nothing behind, and a store that already holds a bad row
(written by an older version) must still list and serve the rest.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from server_helpers import ADMIN, ADMIN_TOKEN, ClientFactory, assert_error

from mpo_core.config import PolicySetConfig
from mpo_core.errors import InvalidParameter
from mpo_core.models.policies import PolicySet
from mpo_core.names import check_name
from server.store import Family, SQLiteProfileStore

WEIGHTS = {"helpful": 1.0, "harmless": 1.0, "concise": 2.0}
# Every C0 control character, DEL and the C1 controls.
CONTROLS = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]]


def _listed(client: TestClient) -> list[str]:
    response = client.get("/admin/profiles", headers=ADMIN)
    assert response.status_code == 200, response.text
    return [p["name"] for p in response.json()["profiles"]]


@pytest.mark.parametrize("control", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
def test_the_name_rule_refuses_every_control_character(control: str) -> None:
    for name in (f"nl{control}", f"{control}nl", f"n{control}l"):
        with pytest.raises(InvalidParameter) as info:
            check_name(name, "name")
        assert info.value.param == "name"
        spec = {"name": name, "model": "m"}
        with pytest.raises(ValueError, match="invalid name"):  # policy names: the same rule
            PolicySetConfig.model_validate({"policies": [spec]})
    assert check_name("nl", "name") == "nl"


def test_no_control_character_reaches_the_store_through_http(admin_client: TestClient) -> None:
    for control in CONTROLS:
        for name in (f"nl{control}", f"{control}nl"):
            path = f"/admin/profiles/{quote(name, safe='')}"
            response = admin_client.put(path, json={"weights": WEIGHTS}, headers=ADMIN)
            assert_error(response, 400, param="name", text="invalid name")
        for field, body in (
            ("default", {"default": f"nl{control}"}),
            ("profile", {"prompts": ["Hi"], "profile": f"nl{control}"}),
        ):
            path = "/admin/profiles" if field == "default" else "/admin/fit"
            method = admin_client.put if field == "default" else admin_client.post
            assert_error(method(path, json=body, headers=ADMIN), 400, param=field)
    assert _listed(admin_client) == []


def test_a_trailing_newline_cannot_become_the_default(admin_client: TestClient) -> None:
    """The issue's reproducer: the name was stored, made the default, and every request
    without weights then got an empty reply (a newline in the X-MPO-Profile header)."""
    response = admin_client.put("/admin/profiles/nl%0A", json={"weights": WEIGHTS}, headers=ADMIN)
    assert_error(response, 400, param="name")
    response = admin_client.put("/admin/profiles", json={"default": "nl\n"}, headers=ADMIN)
    assert_error(response, 400, param="default")
    reply = admin_client.post(
        "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    )
    assert reply.status_code == 200 and "generated_text" in reply.json()
    assert reply.json()["mixing"]["profile"] is None
    assert _listed(admin_client) == []


@pytest.mark.parametrize(
    "meta",
    [
        '{"x": "\\ud800"}',
        '{"\\udfff": 1}',
        '{"x": [{"y": "a\\udc00b"}]}',
    ],
)
def test_a_lone_surrogate_in_meta_is_refused_and_not_stored(
    admin_client: TestClient, meta: str
) -> None:
    body = f'{{"weights": {{"helpful": 1}}, "meta": {meta}}}'
    headers = {**ADMIN, "Content-Type": "application/json"}
    response = admin_client.put("/admin/profiles/poison", content=body, headers=headers)
    assert_error(response, 400, param="meta", text="surrogate")
    assert _listed(admin_client) == []
    assert_error(admin_client.get("/admin/profiles/poison", headers=ADMIN), 404)
    assert_error(admin_client.get("/admin/profiles/poison/versions", headers=ADMIN), 404)
    ok = admin_client.put("/admin/profiles", json={"default": None}, headers=ADMIN)
    assert ok.status_code == 200


def _family(policy_set: PolicySet) -> Family:
    """The family the server keys the tiny family's profiles by."""
    return Family.of(policy_set.served_name, policy_set.names)


def _write_raw(
    path: Path, family: Family, name: str, version: int, weights: str, meta: str
) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO family_profile_versions (family, name, version, weights, strength, "
            "meta, created_at) VALUES (?, ?, ?, ?, 1.0, ?, 0)",
            (family.key, name, version, weights, meta),
        )


def test_a_store_with_bad_rows_still_lists_and_serves_the_rest(
    make_client: ClientFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    policy_set: PolicySet,
) -> None:
    path = tmp_path / "data" / "profiles.sqlite3"
    family = _family(policy_set)
    old = SQLiteProfileStore(path, family)
    old.put("good", {"helpful": 1.0})
    old.put("poison", {"helpful": 1.0})
    _write_raw(path, family, "nl\n", 1, '{"helpful": 1.0}', "{}")  # older versions let these in
    _write_raw(path, family, "poison", 2, '{"helpful": 1.0}', '{"x": "\\ud800"}')
    _write_raw(path, family, "broken", 1, "not json", "{}")
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO family_settings (family, key, value) VALUES (?, 'default_profile', ?)",
            (family.key, "nl\n"),
        )
    client = make_client(admin_token=ADMIN_TOKEN)

    with caplog.at_level(logging.WARNING):
        assert _listed(client) == ["good"]
        reply = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    assert reply.status_code == 200, reply.text
    assert reply.json()["mixing"]["profile"] is None  # the bad default: uniform weights
    assert "x-mpo-profile" not in reply.headers
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    for row in ("'nl\\n' version 1", "'poison' version 2", "'broken' version 1"):
        assert row in warnings

    history = client.get("/admin/profiles/poison/versions", headers=ADMIN)
    assert history.status_code == 200
    assert [v["version"] for v in history.json()["versions"]] == [1]
    assert_error(client.get("/admin/profiles/poison", headers=ADMIN), 404, text="unreadable")
    assert_error(
        client.put("/admin/profiles", json={"default": "poison"}, headers=ADMIN), 404, "profile"
    )
    named = client.post(
        "/generate", json={"inputs": "hi", "parameters": {"profile": "poison", "max_new_tokens": 1}}
    )
    assert_error(named, 404, param="profile", text="unreadable")
    good = client.post(
        "/generate", json={"inputs": "hi", "parameters": {"profile": "good", "max_new_tokens": 1}}
    )
    assert good.status_code == 200 and good.headers["x-mpo-profile"] == "good"

    # The admin can repair: a new version replaces the bad one; a delete removes a row.
    fixed = client.put("/admin/profiles/poison", json={"weights": WEIGHTS}, headers=ADMIN)
    assert fixed.status_code == 200 and fixed.json()["version"] == 3
    assert client.delete("/admin/profiles/nl%0A", headers=ADMIN).status_code == 200
    assert client.delete("/admin/profiles/broken", headers=ADMIN).status_code == 200
    assert _listed(client) == ["good", "poison"]

"""Edges of the HTTP contract: unparsable bodies, 405's Allow, auth before size, the
OpenAPI document's security and what it accepts, paginated profile history."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from server_helpers import ADMIN, ADMIN_TOKEN, ClientFactory, assert_error

JSON = {"Content-Type": "application/json"}
GEN = {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"inputs": "\xff\xfe"}', "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"inputs": "x", "parameters": {"seed": ' + b"9" * 5001 + b"}}", "digits"),
        (b"{nope", "Expecting property name"),
    ],
    ids=["invalid-utf8", "deep-nesting", "huge-integer", "syntax"],
)
def test_every_unparsable_body_is_json_invalid(
    client: TestClient, body: bytes, reason: str
) -> None:
    for path in ("/generate", "/v1/chat/completions"):
        error = assert_error(client.post(path, content=body, headers=JSON), 400, text=reason)
        assert error["code"] == "json_invalid"


def test_405_lists_every_method_of_the_path(admin_client: TestClient) -> None:
    response = admin_client.options("/admin/profiles/x", headers=ADMIN)
    assert_error(response, 405)
    assert response.headers["allow"] == "DELETE, GET, PUT"
    assert admin_client.get("/generate").headers["allow"] == "POST"


def test_a_large_body_without_the_key_gets_401_not_413(make_client: ClientFactory) -> None:
    client = make_client(api_key="sk-edge", admin_token=ADMIN_TOKEN, max_body_bytes=1024)
    big = json.dumps({"inputs": "x" * 4096}).encode()
    assert_error(client.post("/generate", content=big, headers=JSON), 401, text="API key")
    keyed = {**JSON, "Authorization": "Bearer sk-edge"}
    assert_error(client.post("/generate", content=big, headers=keyed), 413)
    admin_put = client.put("/admin/profiles/p", content=big, headers=JSON)
    assert_error(admin_put, 401, text="admin token")
    assert_error(client.put("/admin/profiles/p", content=big, headers={**JSON, **ADMIN}), 413)


def test_openapi_declares_the_bearer_schemes(make_client: ClientFactory) -> None:
    document = make_client(api_key="sk-doc", admin_token=ADMIN_TOKEN).get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert {name: s["scheme"] for name, s in schemes.items()} == {
        "apiKey": "bearer",
        "adminToken": "bearer",
    }
    paths = document["paths"]
    assert paths["/generate"]["post"]["security"] == [{"apiKey": []}]
    assert paths["/admin/profiles/{name}"]["put"]["security"] == [{"adminToken": []}]
    assert "security" not in paths["/health"]["get"]  # open for probes
    assert "security" not in paths["/metrics"]["get"]


def test_profile_history_is_paginated(admin_client: TestClient) -> None:
    for weight in range(1, 6):
        body = {"weights": {"helpful": weight}}
        assert admin_client.put("/admin/profiles/p", json=body, headers=ADMIN).status_code < 300
    url = "/admin/profiles/p/versions"
    first = admin_client.get(url, params={"limit": 2}, headers=ADMIN).json()
    assert [v["version"] for v in first["versions"]] == [1, 2] and first["next"] == 2
    second = admin_client.get(url, params={"limit": 2, "after": 2}, headers=ADMIN).json()
    assert [v["version"] for v in second["versions"]] == [3, 4] and second["next"] == 4
    last = admin_client.get(url, params={"limit": 2, "after": 4}, headers=ADMIN).json()
    assert [v["version"] for v in last["versions"]] == [5] and last["next"] is None
    assert_error(admin_client.get(url, params={"limit": 101}, headers=ADMIN), 400, "limit")

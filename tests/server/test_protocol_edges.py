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


def _schema_accepts(document: dict, model: str, body: object) -> bool:
    from jsonschema import Draft202012Validator

    root = {"$ref": f"#/components/schemas/{model}", "components": document["components"]}
    return Draft202012Validator(root).is_valid(body)


@pytest.mark.parametrize(
    ("model", "body", "path"),
    [
        ("TGIRequest", {"inputs": "0", "parameters": {"weights": []}}, "/generate"),
        ("TGIRequest", {"inputs": "0", "parameters": {"weights": [0, 0, 0]}}, "/generate"),
        ("TGIRequest", {"inputs": "0", "parameters": {"weights": {"nope": 1}}}, "/generate"),
        ("TGIRequest", {"inputs": "0", "parameters": {"stop": [""]}}, "/generate"),
        (
            "TGIRequest",
            {"inputs": "0", "parameters": {"weights": [1, 1, 1], "profile": "p"}},
            "/generate",
        ),
        ("CompletionRequest", {"prompt": "0", "stop": [""]}, "/v1/completions"),
        ("CompletionRequest", {"prompt": ""}, "/v1/completions"),
        ("CompletionRequest", {"prompt": "0", "presence_penalty": 1}, "/v1/completions"),
        (
            "ChatCompletionRequest",
            {"messages": [{"role": "user", "content": "x"}], "n": 9},
            "/v1/chat/completions",
        ),
        ("ProfilePut", {"weights": [1, 1, 1], "version": 1}, "/admin/profiles/p"),
        ("ProfilePut", {}, "/admin/profiles/p"),
        ("FitRequest", {"prompts": ["Hi"], "prompt_file": "p.txt"}, "/admin/fit"),
        ("FitRequest", {}, "/admin/fit"),
    ],
)
def test_the_document_refuses_what_the_server_refuses(
    admin_client: TestClient, model: str, body: dict, path: str
) -> None:
    """The mismatches schemathesis found: each body the server answers 400 is now outside
    the schema too (the schema names this app's policies and limits)."""
    document = admin_client.get("/openapi.json").json()
    method = admin_client.put if path.startswith("/admin/profiles") else admin_client.post
    assert_error(method(path, json=body, headers=ADMIN), 400)
    assert not _schema_accepts(document, model, body)


def test_the_document_accepts_what_the_server_accepts(admin_client: TestClient) -> None:
    document = admin_client.get("/openapi.json").json()
    cases = [
        ("TGIRequest", {"inputs": "Hi", "parameters": {"weights": {"helpful": 1}}}, "/generate"),
        ("TGIRequest", {"inputs": "Hi", "parameters": {"max_new_tokens": 2.0}}, "/generate"),
        ("ProfilePut", {"weights": [1, 0, 0]}, "/admin/profiles/p"),
        ("ProfilePut", {"version": 1}, "/admin/profiles/p"),
    ]
    for model, body, path in cases:
        method = admin_client.put if path.startswith("/admin/profiles") else admin_client.post
        assert method(path, json=body, headers=ADMIN).status_code in (200, 201), body
        assert _schema_accepts(document, model, body), body

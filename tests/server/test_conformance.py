"""Regression tests for the conformance defects of issue 12, through HTTP (TestClient).

The ones that need a real server and connection (stock clients, keep-alive after a 500,
SSE keep-alive comments, the schema fuzz run) are in test_live_server.py.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from fastapi.testclient import TestClient
from server_helpers import ADMIN, ADMIN_TOKEN, ClientFactory, assert_error

from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.models.policies import PolicySet

JSON = {"content-type": "application/json"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_tgi_compat_route_generates_or_streams(client: TestClient) -> None:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}}
    whole = client.post("/", json=body)
    assert whole.status_code == 200, whole.text
    (first,) = whole.json()  # TGI answers POST / with a list of one response
    assert first["details"]["generated_tokens"] <= 3
    assert first["generated_text"] == client.post("/generate", json=body).json()["generated_text"]
    with client.stream("POST", "/", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(x[5:]) for x in response.iter_lines() if x.startswith("data:")]
    assert events[-1]["generated_text"] == first["generated_text"]


def test_tiny_temperature_is_greedy_and_spares_the_batch(client: TestClient) -> None:
    greedy = {"prompt": "Hello", "max_tokens": 6, "ignore_eos": True, "temperature": 0}
    expected = client.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
    results: dict[str, Any] = {}

    def post(name: str, body: dict[str, Any]) -> None:
        results[name] = client.post("/v1/completions", json=body)

    threads = [
        threading.Thread(target=post, args=("tiny", {**greedy, "temperature": 1e-45})),
        threading.Thread(target=post, args=("other", {**greedy, "temperature": 1.0, "n": 2})),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["tiny"].status_code == 200, results["tiny"].text
    assert results["tiny"].json()["choices"][0]["text"] == expected
    assert results["other"].status_code == 200, results["other"].text


def test_lone_surrogates_are_400_naming_the_field(client: TestClient) -> None:
    bad = '"a\\ud800b"'
    cases = {
        "/generate": ('{"inputs": BAD}'.replace("BAD", bad), "inputs"),
        "/v1/completions": ('{"prompt": BAD, "max_tokens": 1}'.replace("BAD", bad), "prompt"),
        "/v1/chat/completions": (
            '{"messages": [{"role": "user", "content": BAD}], "max_tokens": 1}'.replace("BAD", bad),
            "messages.0.content",
        ),
    }
    for path, (body, param) in cases.items():
        assert_error(client.post(path, content=body, headers=JSON), 400, param=param)
    parts = '{"messages": [{"role": "user", "content": [{"type": "text", "text": BAD}]}]}'.replace(
        "BAD", bad
    )
    error = assert_error(client.post("/v1/chat/completions", content=parts, headers=JSON), 400)
    assert error["param"] == "messages.0.content.0.text"
    prompts = '{"prompt": ["ok", BAD], "max_tokens": 1}'.replace("BAD", bad)
    assert_error(client.post("/v1/completions", content=prompts, headers=JSON), 400, "prompt.1")


def test_profile_meta_is_validated_before_anything_is_stored(admin_client: TestClient) -> None:
    deep = "[" * 40 + "]" * 40
    values = ["NaN", "[1, Infinity]", "1e999", deep, '"' + "y" * 70_000 + '"']
    for value in values:
        body = '{"weights": [1, 1, 1], "meta": {"x": ' + value + "}}"
        response = admin_client.put("/admin/profiles/p", content=body, headers={**ADMIN, **JSON})
        assert_error(response, 400, param="meta")
    assert admin_client.get("/admin/profiles/p", headers=ADMIN).status_code == 404  # nothing
    ok = admin_client.put(
        "/admin/profiles/p", json={"weights": [1, 1, 1], "meta": {"a": [{"b": 1.5}]}}, headers=ADMIN
    )
    assert ok.status_code == 201, ok.text
    assert admin_client.get("/admin/profiles", headers=ADMIN).json()["profiles"][0]["meta"] == {
        "a": [{"b": 1.5}]
    }


def test_requests_that_can_never_fit_are_400(make_client: ClientFactory) -> None:
    client = make_client(max_n=64)  # the engine holds 8 running + 32 queued = 40
    many = {"prompt": ["a"] * 6, "n": 8, "max_tokens": 1}
    assert_error(client.post("/v1/completions", json=many), 400, param="n", text="max_queued")
    prompts = {"prompt": ["a"] * 41, "max_tokens": 1}
    assert_error(client.post("/v1/completions", json=prompts), 400, param="prompt")
    chat = {**CHAT, "n": 41}
    assert_error(client.post("/v1/chat/completions", json=chat), 400, param="n", text="40")


def test_fit_with_max_new_tokens_past_the_context_is_400(admin_client: TestClient) -> None:
    body = {"prompts": ["Hello"], "max_new_tokens": 100_000, "iterations": 1}
    response = admin_client.post("/admin/fit", json=body, headers=ADMIN)
    assert_error(response, 400, param="max_new_tokens", text="context limit")
    assert admin_client.get("/admin/fit", headers=ADMIN).json()["jobs"] == []  # none started


def test_info_needs_the_api_key_when_one_is_set(make_client: ClientFactory) -> None:
    client = make_client(api_key="sk-test")
    assert_error(client.get("/info"), 401)
    assert_error(client.get("/v1/models"), 401)
    ok = client.get("/info", headers={"Authorization": "Bearer sk-test"})
    assert ok.status_code == 200 and ok.json()["policies"]
    assert client.get("/health").status_code == 200  # probes stay open
    assert client.get("/metrics").status_code == 200


def test_missing_auth_is_401_before_a_malformed_body(make_client: ClientFactory) -> None:
    client = make_client(api_key="sk-test", admin_token=ADMIN_TOKEN)
    broken = b'{"inputs": '
    assert_error(client.post("/generate", content=broken, headers=JSON), 401)
    assert_error(client.post("/v1/completions", content=broken, headers=JSON), 401)
    assert_error(client.put("/admin/profiles/p", content=broken, headers=JSON), 401)
    authed = {**JSON, "Authorization": "Bearer sk-test"}
    assert_error(client.post("/generate", content=broken, headers=authed), 400)
    too_deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # the parser gives up
    assert_error(client.post("/generate", content=too_deep, headers=JSON), 401)
    assert_error(client.post("/generate", content=too_deep, headers=authed), 400)


def test_strict_types(admin_client: TestClient) -> None:
    base = {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}
    for field, value in [("max_new_tokens", True), ("max_new_tokens", "10"), ("seed", 1.5),
                         ("details", 1), ("temperature", "0.5"), ("weights", {"helpful": "1"}),
                         ("weights", [True, 1, 1]), ("strength", "1")]:  # fmt: skip
        body = {**base, "parameters": {**base["parameters"], field: value}}
        error = assert_error(admin_client.post("/generate", json=body), 400)
        assert error["param"].startswith(f"parameters.{field}"), (field, value, error)
    chat = {**CHAT, "stream": "true"}
    assert_error(admin_client.post("/v1/chat/completions", json=chat), 400, param="stream")
    fit = {"prompts": ["Hi"], "activate": 0}
    assert_error(admin_client.post("/admin/fit", json=fit, headers=ADMIN), 400, param="activate")
    # Integers stay valid where a float is expected, and (as JSON Schema's `integer` says)
    # a whole number written 3.0 is that integer.
    body = {**base, "parameters": {"max_new_tokens": 1, "temperature": 1, "weights": [1, 0, 0]}}
    assert admin_client.post("/generate", json=body).status_code == 200
    whole_numbers = {"max_new_tokens": 2.0, "seed": 7.0, "top_k": 3.0, "details": True}
    whole = admin_client.post("/generate", json={**base, "parameters": whole_numbers})
    assert whole.status_code == 200 and whole.json()["details"]["generated_tokens"] <= 2
    chat = {**CHAT, "max_tokens": 1.0, "n": 2.0}
    assert len(admin_client.post("/v1/chat/completions", json=chat).json()["choices"]) == 2


def test_empty_admin_token_disables_admin(make_client: ClientFactory) -> None:
    client = make_client(admin_token="")
    error = assert_error(client.get("/admin/profiles", headers=ADMIN), 403)
    assert error["code"] == "admin_disabled"


def test_negative_zero_weights_are_echoed_as_zero(admin_client: TestClient) -> None:
    weights = '{"helpful": 1, "harmless": -0.0, "concise": 0}'
    body = '{"inputs": "Hi", "parameters": {"max_new_tokens": 1, "weights": ' + weights + "}}"
    response = admin_client.post("/generate", content=body, headers=JSON)
    assert response.status_code == 200, response.text
    assert '"harmless":-0' not in response.text and '"harmless":0.0' in response.text
    assert "harmless=-0" not in response.headers["x-mpo-weights"]
    stored = admin_client.put(
        "/admin/profiles/z", content='{"weights": ' + weights + "}", headers={**ADMIN, **JSON}
    )
    assert stored.status_code == 201 and '"harmless":-0' not in stored.text


def test_openapi_documents_real_statuses_and_media_types(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    error_ref = "#/components/schemas/ErrorResponse"
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": error_ref}, (method, path, status)
    generate = doc["paths"]["/generate"]["post"]["responses"]
    assert {"400", "401", "413", "429", "503"} <= set(generate)
    assert (
        "text/event-stream"
        in doc["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]
    )
    assert (
        "application/json"
        not in doc["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]
    )
    for path in ("/", "/v1/completions", "/v1/chat/completions"):
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert {"application/json", "text/event-stream"} <= set(content), path
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "409" in doc["paths"]["/admin/fit"]["post"]["responses"]
    assert "403" in doc["paths"]["/admin/profiles"]["get"]["responses"]
    assert "401" in doc["paths"]["/info"]["get"]["responses"]


def test_capacity_uses_the_engines_limits(
    make_client: ClientFactory, policy_set: PolicySet
) -> None:
    own = Engine(policy_set, EngineLimits(max_running=1, max_queued=1))
    client = make_client(engine_override=own)
    try:
        body = {"prompt": ["a", "b", "c"], "max_tokens": 1}
        assert_error(client.post("/v1/completions", json=body), 400, param="prompt", text="2")
    finally:
        own.stop(timeout=2)

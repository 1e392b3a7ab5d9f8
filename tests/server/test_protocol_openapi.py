"""The OpenAPI document and the server agree on the bodies they once disagreed on.

Each body is checked twice: against the document's own schema (JSON Schema 2020-12, as
OpenAPI 3.1 writes it) and against the server; the two verdicts must match, and a refusal
is a 400 naming the field. The schemathesis runs of tests/server/test_live_server.py check
the same agreement over generated bodies.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator
from server_helpers import ADMIN, ADMIN_TOKEN, assert_error

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
TGI = {"inputs": "Hi"}

# (path, schema, body, the field a refusal names; None: accepted by both)
CASES: list[tuple[str, str, dict[str, Any], str | None]] = [
    ("/generate", "TGIRequest",
     {**TGI, "parameters": {"max_new_tokens": 1, "profile": None, "weights": None}}, None),
    ("/generate", "TGIRequest",
     {**TGI, "parameters": {"max_new_tokens": 1, "weights": {"helpful": 1}, "profile": None}},
     None),
    ("/v1/completions", "CompletionRequest",
     {"prompt": "Hi", "max_tokens": 1, "profile": None, "weights": None}, None),
    ("/generate", "TGIRequest", {**TGI, "parameters": {"max_new_tokens": 1, "watermark": 0}},
     "parameters.watermark"),
    ("/generate", "TGIRequest",
     {**TGI, "parameters": {"max_new_tokens": 1, "watermark": False}}, None),
    ("/v1/chat/completions", "ChatCompletionRequest", {**CHAT, "response_format": {}}, None),
    ("/v1/chat/completions", "ChatCompletionRequest",
     {**CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
    ("/generate", "TGIRequest",
     {**TGI, "parameters": {"max_new_tokens": 1, "response_format": {}}},
     "parameters.response_format"),
    ("/generate", "TGIRequest",
     {**TGI, "parameters": {"max_new_tokens": 1, "grammar": {"type": "regex"}}},
     "parameters.grammar"),
    ("/admin/fit", "FitRequest", {"prompt_file": ""}, "prompt_file"),
    ("/admin/fit", "FitRequest", {}, "prompts"),
    ("/admin/fit", "FitRequest", {"prompts": ["Hi"], "prompt_file": "a.txt"}, "prompt_file"),
    ("/v1/chat/completions", "ChatCompletionRequest", {**CHAT, "top_logprobs": 2},
     "top_logprobs"),
    ("/v1/chat/completions", "ChatCompletionRequest",
     {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", "CompletionRequest", {"prompt": "Hi", "best_of": 2}, "best_of"),
    ("/generate", "TGIRequest",
     {**TGI, "parameters": {"max_new_tokens": 1, "mixtures": "each", "details": True}}, None),
    ("/generate", "TGIRequest", {**TGI, "parameters": {"max_new_tokens": 1, "mixtures": "each"}},
     "parameters.mixtures"),
    ("/v1/completions", "CompletionRequest",
     {"prompt": "Hi", "max_tokens": 1, "mixtures": [{"weights": {"helpful": 2, "concise": -1},
                                                     "plausibility": 0.5}, {}]}, None),
    ("/v1/completions", "CompletionRequest",
     {"prompt": "Hi", "max_tokens": 1, "mixtures": [{"weights": {"ghost": 1}}]},
     "mixtures.0.weights.ghost"),
    ("/v1/completions", "CompletionRequest",
     {"prompt": "Hi", "max_tokens": 1, "weights": [2, 0, -1], "plausibility": 1}, "plausibility"),
]  # fmt: skip


@pytest.fixture
def fit_client(make_client: Any) -> TestClient:
    """Admin routes on (every fit body here is refused: no fit runs)."""
    return make_client(admin_token=ADMIN_TOKEN)


def _validator(client: TestClient, schema: str) -> Draft202012Validator:
    document = client.get("/openapi.json").json()
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema}", "components": document["components"]}
    )


@pytest.mark.parametrize("path, schema, body, param", CASES)
def test_the_schema_and_the_server_agree(
    fit_client: TestClient, path: str, schema: str, body: dict[str, Any], param: str | None
) -> None:
    schema_valid = _validator(fit_client, schema).is_valid(body)
    if param is None:
        assert schema_valid, body
        response = fit_client.post(path, json=body, headers=ADMIN)
        assert response.status_code == 200, response.text
    else:
        assert not schema_valid, body
        response = fit_client.post(path, json=body, headers=ADMIN)
        error = assert_error(response, 400, param=param)
        assert "body" not in error["message"].split(":")[0], error  # the field, not "body"


def test_max_tokens_past_the_context_is_the_documented_exception(client: TestClient) -> None:
    """JSON Schema cannot count tokens: the schema bounds max_tokens by the context limit
    less the one token a prompt has at least, and says that prompt + max_tokens must fit
    the limit; past it is a 400 naming max_tokens."""
    document = client.get("/openapi.json").json()
    prop = document["components"]["schemas"]["CompletionRequest"]["properties"]["max_tokens"]
    limit = client.app.state.serving.engine.max_context  # type: ignore[attr-defined]
    assert "context" in prop["description"]
    assert any(m.get("maximum") == limit - 1 for m in prop.get("anyOf", [prop]))
    body = {"prompt": "Hi there", "max_tokens": limit - 1}  # schema-valid, two tokens of prompt
    response = client.post("/v1/completions", json=body)
    assert_error(response, 400, param="max_tokens", text="context limit")


def test_a_profile_named_through_model_is_reported_on_model(client: TestClient) -> None:
    """``model: "<served>:nope"`` names the profile with ``model``: the 404 names it."""
    body = {**CHAT, "model": "tiny:nope"}
    error = assert_error(client.post("/v1/chat/completions", json=body), 404, param="model")
    assert error["code"] == "profile_not_found" and "nope" in error["message"]
    named = {**CHAT, "profile": "nope"}
    error = assert_error(client.post("/v1/chat/completions", json=named), 404, param="profile")
    assert error["code"] == "profile_not_found"


def test_a_fit_is_accepted_as_queued_as_docs_fitting_says(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 202 of ``POST /admin/fit`` is the job as accepted, ``queued``, even when its
    thread is already sampling by the time the answer is written; docs/fitting.md's
    example shows the same state."""
    import re
    import threading
    from pathlib import Path

    from mpo_core.fitting import driver as fit_driver

    started, release = threading.Event(), threading.Event()

    def held(*args: Any, **kwargs: Any) -> Any:
        started.set()
        release.wait(timeout=60)  # the bound only guards a broken test
        raise RuntimeError("stub driver: nothing to fit")

    monkeypatch.setattr(fit_driver, "run_fit", held)
    client = make_client(admin_token=ADMIN_TOKEN)
    try:
        body = {"prompts": ["Hi"], "iterations": 1, "max_new_tokens": 1, "samples_per_prompt": 2}
        response = client.post("/admin/fit", json=body, headers=ADMIN)
        assert response.status_code == 202, response.text
        assert started.wait(timeout=60)  # the job's thread runs the driver: it is sampling
        job = client.get(f"/admin/fit/{response.json()['id']}", headers=ADMIN).json()
        assert job["state"] == "sampling" and response.json()["state"] == "queued"
    finally:
        release.set()
    doc = (Path(__file__).parents[2] / "docs" / "fitting.md").read_text()
    documented = re.search(r'# 202 \{"id": \.\.\., "state": "(\w+)"\}', doc)
    assert documented is not None and documented.group(1) == response.json()["state"]

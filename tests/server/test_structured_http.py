"""Structured output over HTTP: OpenAI response_format, TGI grammar, LoRAX JSON mode."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
from fastapi.testclient import TestClient
from server_helpers import assert_error, sse_events

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "rain": {"type": "boolean"},
        "days": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": 7},
            "maxItems": 3,
        },
    },
    "required": ["city", "rain", "days"],
    "additionalProperties": False,
}
JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True},
}
CHAT: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Weather as JSON"}],
    "max_tokens": 150,
}


def test_chat_json_schema_with_n_and_logprobs(client: TestClient) -> None:
    body = {**CHAT, "response_format": JSON_SCHEMA, "n": 3, "temperature": 1.0, "seed": 5,
            "logprobs": True, "weights": {"helpful": 2, "concise": 1}}  # fmt: skip
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        content = choice["message"]["content"]
        jsonschema.validate(json.loads(content), SCHEMA)
        entries = choice["logprobs"]["content"]
        assert b"".join(bytes(e["bytes"]) for e in entries) == content.encode()


def test_streamed_chat_json_object(client: TestClient) -> None:
    body = {**CHAT, "response_format": {"type": "json_object"}, "stream": True,
            "temperature": 1.0, "seed": 2, "max_tokens": 200,
            "weights": [1, 0, 0]}  # fmt: skip
    chunks = sse_events(client, "/v1/chat/completions", body)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(text), dict)


def test_completion_response_format(client: TestClient) -> None:
    body = {"prompt": "JSON:", "max_tokens": 150, "temperature": 1.0, "seed": 9,
            "response_format": JSON_SCHEMA}  # fmt: skip
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    jsonschema.validate(json.loads(response.json()["choices"][0]["text"]), SCHEMA)


def test_tgi_grammar_json_and_regex(client: TestClient) -> None:
    params = {"max_new_tokens": 150, "do_sample": True, "seed": 4, "details": True}
    grammar = {"type": "json", "value": SCHEMA}
    body = client.post(
        "/generate", json={"inputs": "JSON:", "parameters": {**params, "grammar": grammar}}
    )
    assert body.status_code == 200, body.text
    assert body.json()["details"]["finish_reason"] == "eos_token"
    jsonschema.validate(json.loads(body.json()["generated_text"]), SCHEMA)
    pattern = r"[A-Z][a-z]{1,6} (is|was) [0-9]{1,2}"
    regex = {"type": "regex", "value": pattern}
    for seed in range(3):
        events = sse_events(
            client, "/generate_stream",
            {"inputs": "Say", "parameters": {**params, "seed": seed, "grammar": regex}},
        )  # fmt: skip
        assert re.fullmatch(pattern, events[-1]["generated_text"]), events[-1]
    lorax = {"type": "json_object", "schema": SCHEMA}
    body = client.post(
        "/generate", json={"inputs": "JSON:", "parameters": {**params, "response_format": lorax}}
    )
    jsonschema.validate(json.loads(body.json()["generated_text"]), SCHEMA)


def test_uncompilable_or_malformed_grammars_are_400s(client: TestClient) -> None:
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    cases = [
        ("/v1/chat/completions", {**CHAT, "response_format": bad_schema}, "response_format"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}},
         "response_format"),
        ("/v1/completions", {"prompt": "x", "response_format": bad_schema}, "response_format"),
        ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(a"}}},
         "parameters.grammar"),
        ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "ebnf", "value": "a"}}},
         "parameters.grammar"),
        ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": "{"}}},
         "parameters.grammar"),
        ("/generate_stream",
         {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": 3}}},
         "parameters.grammar"),
    ]  # fmt: skip
    for path, body, param in cases:
        assert_error(client.post(path, json=body), 400, param)
    both = {"grammar": {"type": "regex", "value": "a"}, "response_format": {"type": "json_object"}}
    assert_error(client.post("/generate", json={"inputs": "x", "parameters": both}), 400)
    ignore = {**CHAT, "response_format": {"type": "json_object"}, "ignore_eos": True}
    assert_error(client.post("/v1/chat/completions", json=ignore), 400, "ignore_eos")

"""OpenAI routes through HTTP: completions, chat completions (both streaming), models."""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi.testclient import TestClient
from server_helpers import ADMIN, assert_error, sse_events

from mpo_core.engine.core import Engine

CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "Say hi"}]}


def test_completion(client: TestClient) -> None:
    response = client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "Hello", "max_tokens": 5, "ignore_eos": True},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int) and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5
    assert body["mixing"]["weights"] == {"helpful": 1 / 3, "harmless": 1 / 3, "concise": 1 / 3}
    assert "helpful=0.333333" in response.headers["x-mpo-weights"]


def test_completion_logprobs_n_and_batch(client: TestClient) -> None:
    body = client.post(
        "/v1/completions",
        json={"prompt": ["Hi", "Thank you"], "n": 2, "max_tokens": 3, "logprobs": 2,
              "temperature": 1.0, "seed": 3, "ignore_eos": True, "echo": False},
    ).json()  # fmt: skip
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for choice in body["choices"]:
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == 3 == len(logprobs["token_logprobs"])
        assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"])  # texts may collide
        assert logprobs["text_offset"][0] == 0
    assert body["usage"]["completion_tokens"] == 12
    again = client.post(
        "/v1/completions",
        json={"prompt": ["Hi", "Thank you"], "n": 2, "max_tokens": 3, "temperature": 1.0,
              "seed": 3, "ignore_eos": True},
    ).json()  # fmt: skip
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in body["choices"]]


def test_completion_echo_and_token_prompt(client: TestClient, engine: Engine) -> None:
    ids = engine.tokenizer.encode("Hello")
    body = client.post(
        "/v1/completions", json={"prompt": ids, "max_tokens": 2, "echo": True}
    ).json()
    assert body["choices"][0]["text"].startswith("Hello")
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_completion_stream_with_usage(client: TestClient) -> None:
    events = sse_events(
        client, "/v1/completions",
        {"prompt": "Hi", "max_tokens": 4, "stream": True, "ignore_eos": True, "temperature": 0,
         "stream_options": {"include_usage": True}},
    )  # fmt: skip
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
    text_chunks = events[:-2]
    assert len(text_chunks) == 4
    assert all(c["usage"] is None for c in text_chunks)
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len({c["id"] for c in events[:-1]}) == 1
    whole = client.post(
        "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "temperature": 0},
    ).json()
    streamed = "".join(c["choices"][0]["text"] for c in text_chunks)
    assert streamed == whole["choices"][0]["text"]


def test_chat_completion(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={**CHAT, "model": "tiny", "max_completion_tokens": 4, "logprobs": True,
              "top_logprobs": 2, "ignore_eos": True},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert len(content) == 4
    for item in content:
        assert len(item["top_logprobs"]) == 2
        assert item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][1]["logprob"]
        assert set(item["policy_logprobs"]) == {"helpful", "harmless", "concise"}
        if "\ufffd" not in item["token"]:  # a whole character: its text is its bytes
            assert item["bytes"] == list(item["token"].encode())
    # The prompt came from the chat template: <|user|>Say hi<|eos|><|assistant|>
    assert body["usage"]["prompt_tokens"] > 3


def test_chat_stream(client: TestClient) -> None:
    events = sse_events(
        client, "/v1/chat/completions",
        {**CHAT, "max_tokens": 3, "stream": True, "n": 2, "ignore_eos": True},
    )  # fmt: skip
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    roles = [c for c in chunks if c["choices"][0]["delta"].get("role") == "assistant"]
    assert sorted(c["choices"][0]["index"] for c in roles) == [0, 1]
    finishes = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finishes) == [0, 1]
    assert all(f["finish_reason"] == "length" for f in finishes)
    assert "usage" not in chunks[0]  # no include_usage: no usage field


def test_stop_string_gives_stop(client: TestClient) -> None:
    body = {**CHAT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": True}
    free = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    tokens = [t["token"] for t in free["logprobs"]["content"]]
    stop = next(t for t in tokens[1:] if re.fullmatch(r"\s?[A-Za-z]{2,}", t))  # a whole word
    stopped = client.post("/v1/chat/completions", json={**body, "stop": stop}).json()
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert stop not in choice["message"]["content"]
    assert free["message"]["content"].startswith(choice["message"]["content"])


def test_models_lists_profiles(admin_client: TestClient) -> None:
    put = admin_client.put(
        "/admin/profiles/safe", json={"weights": {"harmless": 1.0}}, headers=ADMIN
    )
    assert put.status_code == 201, put.text
    data = admin_client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data if m["parent"] is None] == ["tiny", "tiny:safe"]
    assert all(m["object"] == "model" for m in data)
    body = admin_client.post(
        "/v1/chat/completions", json={**CHAT, "model": "tiny:safe", "max_tokens": 2}
    )
    assert body.json()["mixing"] == {
        "weights": {"helpful": 0.0, "harmless": 1.0, "concise": 0.0},
        "strength": 1.0,
        "plausibility": 0.0,  # no negative term: no constraint
        "profile": "safe",
    }
    assert body.headers["x-mpo-profile"] == "safe"
    by_body = admin_client.post(
        "/v1/completions", json={"prompt": "Hi", "profile": "safe", "max_tokens": 1}
    )
    assert by_body.json()["mixing"]["profile"] == "safe"


def test_extra_body_fields_mix(client: TestClient) -> None:
    body = client.post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 2, "weights": [1, 1, 2], "strength": 0.5},
    ).json()
    assert body["mixing"]["weights"] == {"helpful": 0.25, "harmless": 0.25, "concise": 0.5}
    assert math.isclose(body["mixing"]["strength"], 0.5)


def test_openai_errors(client: TestClient) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 99}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"top_logprobs": 3}, ""),  # needs logprobs: true
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"stream_options": {"include_usage": True}}, ""),
        ({"tools": [{"type": "function"}]}, ""),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"weights": {"ghost": 1.0}}, "weights.ghost"),
        ({"strength": -2}, "strength"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a"] * 40}, "stop"),
        ({"bogus": True}, "bogus"),
    ]
    for extra, param in cases:
        response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, **extra})
        error = assert_error(response, 400)
        if param:
            assert error["param"] == param, (extra, error)
    too_long = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 10_000})
    assert_error(too_long, 400, param="max_tokens", text="context limit of 256 tokens")
    assert_error(client.post("/v1/completions", json={"prompt": []}), 400, param="prompt")
    assert_error(client.post("/v1/completions", json={"prompt": [[999_999]]}), 400, param="prompt")


def test_unknown_model_and_profile_give_404(client: TestClient) -> None:
    assert_error(
        client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404, param="model"
    )
    assert_error(
        client.post("/v1/chat/completions", json={**CHAT, "model": "tiny:nope"}), 404,
        param="model", text="nope",
    )  # fmt: skip
    assert_error(client.post("/v1/completions", json={"prompt": "x", "profile": "nope"}), 404)
    assert_error(
        client.post("/generate", json={"inputs": "x", "parameters": {"profile": "nope"}}), 404
    )


def test_chat_without_template_is_a_clear_400(client: TestClient, engine: Engine) -> None:
    tokenizer = engine.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    finally:
        tokenizer.chat_template = saved
    assert_error(response, 400, param="messages", text="no chat template")

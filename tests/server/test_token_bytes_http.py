"""Token bytes over HTTP: a scripted reply with emoji and CJK rebuilds from its logprobs.

The scripted runner makes every model put its mass on the next token of a known reply,
so a greedy request answers exactly that reply and the test knows what to expect.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from server_helpers import ClientFactory, assert_error, sse_events

from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.models.policies import PolicySet
from mpo_core.testing.families import ScriptedRunner

REPLY = "Hi 🌍🚀🎉 世界, ok!"


@pytest.fixture(scope="module")
def scripted(policy_set: PolicySet) -> Iterator[Engine]:
    tokenizer = policy_set.tokenizer
    script = tokenizer.encode(REPLY, add_special_tokens=False)
    models = len(policy_set.policies) + (policy_set.reference is not None)
    runner = ScriptedRunner(models, policy_set.vocab_size, script, tokenizer.eos_token_id)
    engine = Engine(policy_set, EngineLimits(max_running=4), runner=runner).start()
    yield engine
    engine.stop(timeout=5)


@pytest.fixture
def sclient(make_client: ClientFactory, scripted: Engine) -> TestClient:
    return make_client(engine_override=scripted)


CHAT: dict[str, Any] = {
    "messages": [{"role": "user", "content": "What does this emoji mean: 🌍🚀🎉?"}],
    "temperature": 0,
    "max_tokens": 60,
    "logprobs": True,
    "top_logprobs": 2,
}


def test_chat_logprob_bytes_rebuild_the_reply(sclient: TestClient) -> None:
    body = sclient.post("/v1/chat/completions", json=CHAT).json()
    (choice,) = body["choices"]
    assert choice["message"]["content"] == REPLY and choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert b"".join(bytes(e["bytes"]) for e in content) == REPLY.encode("utf-8")
    assert any(e["token"] == "\ufffd" for e in content)  # split characters: bytes carry them
    assert all(e["token"] != "<|eos|>" for e in content)  # the end of turn is not listed
    for entry in content:  # the best alternative is the chosen token, with the same bytes
        assert entry["top_logprobs"][0]["bytes"] == entry["bytes"]


def test_streamed_chat_logprob_bytes_rebuild_the_reply(sclient: TestClient) -> None:
    chunks = sse_events(sclient, "/v1/chat/completions", {**CHAT, "stream": True})
    entries = [
        entry
        for chunk in chunks[:-1]
        for choice in chunk["choices"]
        if choice["logprobs"] is not None
        for entry in choice["logprobs"]["content"]
    ]
    assert b"".join(bytes(e["bytes"]) for e in entries) == REPLY.encode("utf-8")


def test_tgi_token_texts_join_to_the_reply(sclient: TestClient) -> None:
    body = sclient.post(
        "/generate", json={"inputs": "Hi", "parameters": {"details": True, "max_new_tokens": 60}}
    ).json()
    assert body["generated_text"] == REPLY
    tokens = body["details"]["tokens"]
    assert tokens[-1]["special"] and body["details"]["finish_reason"] == "eos_token"
    assert "".join(t["text"] for t in tokens if not t["special"]) == REPLY
    assert all("\ufffd" not in t["text"] for t in tokens)


def test_stop_token_ids_end_the_reply_on_both_apis(sclient: TestClient, scripted: Engine) -> None:
    tokenizer = scripted.tokenizer
    script = tokenizer.encode(REPLY, add_special_tokens=False)
    stop_id = script[5]
    expected = tokenizer.decode(script[:5])
    chat = sclient.post("/v1/chat/completions", json={**CHAT, "stop_token_ids": [stop_id]})
    choice = chat.json()["choices"][0]
    assert choice["message"]["content"] == expected and choice["finish_reason"] == "stop"
    assert len(choice["logprobs"]["content"]) == 5  # the stop token is not listed
    tgi = sclient.post(
        "/generate",
        json={"inputs": "Hi", "parameters": {"details": True, "stop_token_ids": [stop_id]}},
    ).json()
    assert tgi["details"]["finish_reason"] == "stop_sequence"
    assert tgi["details"]["tokens"][-1]["id"] == stop_id and tgi["generated_text"] == expected


def test_stop_token_ids_outside_the_vocabulary_are_a_400(sclient: TestClient) -> None:
    response = sclient.post("/v1/chat/completions", json={**CHAT, "stop_token_ids": [10**6]})
    assert_error(response, 400, "stop_token_ids", "outside the vocabulary")
    response = sclient.post(
        "/generate", json={"inputs": "Hi", "parameters": {"stop_token_ids": [-1]}}
    )
    assert_error(response, 400, "stop_token_ids")

"""Prompt log-probs over HTTP: TGI decoder_input_details and OpenAI echo + logprobs."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_helpers import assert_error, sse_events

from mpo_core.engine.core import Engine

PROMPT = "Could you please help me write a poem?"
WEIGHTS = {"helpful": 3, "harmless": 0, "concise": 1}


def expected(engine: Engine, weights: dict[str, float]) -> list[float | None]:
    ids = engine.tokenizer.encode(PROMPT)
    return engine.prompt_logprobs(ids, engine.mixture(weights)).result().logprobs


def test_tgi_prefill_is_the_prompt_under_the_mixture(client: TestClient, engine: Engine) -> None:
    params = {"details": True, "decoder_input_details": True, "max_new_tokens": 3,
              "weights": WEIGHTS, "top_n_tokens": 2}  # fmt: skip
    body = client.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
    prefill = body["details"]["prefill"]
    ids = engine.tokenizer.encode(PROMPT)
    assert [t["id"] for t in prefill] == ids
    assert "".join(t["text"] for t in prefill) == PROMPT
    assert prefill[0]["logprob"] is None
    want = expected(engine, WEIGHTS)
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx(want[1:], abs=1e-5)
    assert want[1:] != pytest.approx(expected(engine, {"harmless": 1})[1:], abs=1e-3)
    assert len(body["details"]["top_tokens"]) == 3  # top_n_tokens: per generated step
    plain = client.post("/generate", json={"inputs": PROMPT, "parameters": {"details": True}})
    assert plain.json()["details"]["prefill"] == []


def test_tgi_stream_refuses_decoder_input_details(client: TestClient) -> None:
    body = {"inputs": PROMPT, "parameters": {"decoder_input_details": True}}
    response = client.post("/generate_stream", json=body)
    assert_error(response, 400, "parameters.decoder_input_details")


def test_completion_echo_with_logprobs(client: TestClient, engine: Engine) -> None:
    ids = engine.tokenizer.encode(PROMPT)
    body = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 3,
            "ignore_eos": True, "weights": WEIGHTS, "n": 2, "seed": 1}  # fmt: skip
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    want = expected(engine, WEIGHTS)
    for choice in response.json()["choices"]:
        assert choice["text"].startswith(PROMPT)
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(ids) + 3
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["token_logprobs"][1 : len(ids)] == pytest.approx(want[1:], abs=1e-5)
        assert all(len(top) <= 2 for top in logprobs["top_logprobs"][1:])
        assert logprobs["text_offset"][0] == 0
        assert logprobs["text_offset"][len(ids)] == len(PROMPT)  # the reply starts there


def test_streamed_completion_echo_sends_the_prompt_logprobs_first(
    client: TestClient, engine: Engine
) -> None:
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 2, "stream": True,
            "weights": WEIGHTS}  # fmt: skip
    chunks = sse_events(client, "/v1/completions", body)
    opening = chunks[0]["choices"][0]
    assert opening["text"] == PROMPT
    assert opening["logprobs"]["token_logprobs"][1:] == pytest.approx(
        expected(engine, WEIGHTS)[1:], abs=1e-5
    )

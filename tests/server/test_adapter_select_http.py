"""One model alone: TGI/LoRAX ``adapter_id`` and OpenAI ``model: "<served>/<policy>"``."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from server_helpers import assert_error

GREEDY: dict[str, Any] = {"max_new_tokens": 6, "ignore_eos": True, "details": True}


def tgi(client: TestClient, **params: Any) -> dict[str, Any]:
    response = client.post(
        "/generate", json={"inputs": "Hello", "parameters": {**GREEDY, **params}}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_adapter_id_serves_that_policy_alone(client: TestClient) -> None:
    alone = tgi(client, adapter_id="harmless")
    assert alone["mixing"]["weights"] == {"helpful": 0.0, "harmless": 1.0, "concise": 0.0}
    assert alone["mixing"]["strength"] == 1.0
    explicit = tgi(client, weights={"harmless": 1})
    assert alone["generated_text"] == explicit["generated_text"]
    for token in alone["details"]["tokens"]:  # the other policies never ran
        assert token["policy_logprobs"]["helpful"] is None
        assert token["policy_logprobs"]["harmless"] is not None
    assert tgi(client, adapter_id="helpful")["generated_text"] != alone["generated_text"]


def test_adapter_id_may_name_the_reference(client: TestClient) -> None:
    reference = tgi(client, adapter_id="base")
    assert reference["mixing"]["strength"] == 0.0
    assert reference["generated_text"] == tgi(client, strength=0.0)["generated_text"]


def test_unknown_or_combined_adapters(client: TestClient) -> None:
    body = {"inputs": "Hello", "parameters": {"adapter_id": "nope"}}
    error = assert_error(client.post("/generate", json=body), 404, "parameters.adapter_id", "nope")
    assert error["code"] == "adapter_not_found"
    body = {"inputs": "Hello", "parameters": {"adapter_id": "helpful", "weights": [1, 2, 3]}}
    assert_error(client.post("/generate", json=body), 400, "weights")
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = client.post("/v1/chat/completions", json={**chat, "model": "tiny/nope"})
    assert assert_error(response, 404, "model", "nope")["code"] == "adapter_not_found"
    response = client.post("/v1/chat/completions", json={**chat, "model": "nope"})
    assert assert_error(response, 404, "model")["code"] == "model_not_found"
    response = client.post(
        "/v1/chat/completions", json={**chat, "model": "helpful", "profile": "x"}
    )
    assert_error(response, 400, "profile")


def test_openai_model_names_select_one_policy(client: TestClient) -> None:
    body = {"prompt": "Hello", "max_tokens": 6, "ignore_eos": True, "temperature": 0}
    texts = {}
    for model in ("tiny/concise", "concise"):
        response = client.post("/v1/completions", json={**body, "model": model})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model
        assert response.json()["mixing"]["weights"]["concise"] == 1.0
        texts[model] = response.json()["choices"][0]["text"]
    explicit = client.post("/v1/completions", json={**body, "weights": {"concise": 1}}).json()
    assert texts["tiny/concise"] == texts["concise"] == explicit["choices"][0]["text"]


def test_models_lists_each_policy_with_its_family(client: TestClient) -> None:
    cards = client.get("/v1/models").json()["data"]
    singles = {c["id"]: c["parent"] for c in cards if c["parent"] is not None}
    assert singles == {"helpful": "tiny", "harmless": "tiny", "concise": "tiny", "base": "tiny"}
    assert cards[0]["id"] == "tiny" and cards[0]["parent"] is None

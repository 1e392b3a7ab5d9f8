"""TGI routes through HTTP: /generate and /generate_stream."""

from __future__ import annotations

import math
import re

import pytest
from fastapi.testclient import TestClient
from server_helpers import assert_error, sse_events

from mpo_core.models.policies import PolicySet

POLICIES = ["helpful", "harmless", "concise"]


def generate(client: TestClient, **parameters: object) -> dict:
    response = client.post("/generate", json={"inputs": "Hello there", "parameters": parameters})
    assert response.status_code == 200, response.text
    return response.json()


def test_generate_details_and_policy_logprobs(client: TestClient) -> None:
    body = generate(client, max_new_tokens=5, details=True, top_n_tokens=3, ignore_eos=True)
    details = body["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 5 == len(details["tokens"])
    assert details["seed"] is None  # greedy
    for token, top in zip(details["tokens"], details["top_tokens"], strict=True):
        assert set(token) >= {"id", "text", "logprob", "special", "policy_logprobs"}
        assert set(token["policy_logprobs"]) == set(POLICIES)
        assert all(lp <= 0 for lp in token["policy_logprobs"].values())
        assert len(top) == 3
        assert top[0]["id"] == token["id"]  # greedy picks the mixture's best token
        assert math.isclose(top[0]["logprob"], token["logprob"], rel_tol=1e-5)
    assert body["generated_text"] == "".join(t["text"] for t in details["tokens"])
    assert body["mixing"]["weights"] == {name: 1 / 3 for name in POLICIES}


def test_generate_without_details_and_full_text(client: TestClient) -> None:
    body = generate(client, max_new_tokens=3, return_full_text=True)
    assert "details" not in body
    assert body["generated_text"].startswith("Hello there")


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(client: TestClient) -> None:
    a = generate(client, max_new_tokens=6, ignore_eos=True)
    b = generate(client, max_new_tokens=6, ignore_eos=True)
    assert a["generated_text"] == b["generated_text"]
    s1 = generate(client, max_new_tokens=6, do_sample=True, seed=7, details=True, ignore_eos=True)
    s2 = generate(client, max_new_tokens=6, do_sample=True, seed=7, details=True, ignore_eos=True)
    assert s1["details"]["seed"] == 7
    assert [t["id"] for t in s1["details"]["tokens"]] == [t["id"] for t in s2["details"]["tokens"]]
    s3 = generate(client, max_new_tokens=6, do_sample=True, seed=8, details=True, ignore_eos=True)
    assert [t["id"] for t in s3["details"]["tokens"]] != [t["id"] for t in s1["details"]["tokens"]]


def test_sampling_without_seed_reports_the_seed_it_drew(client: TestClient) -> None:
    body = generate(client, max_new_tokens=2, temperature=0.8, details=True)
    assert isinstance(body["details"]["seed"], int)


def test_one_hot_weights_skip_other_policies(client: TestClient) -> None:
    body = generate(client, max_new_tokens=3, details=True, weights={"harmless": 2.0})
    assert body["mixing"]["weights"] == {"helpful": 0.0, "harmless": 1.0, "concise": 0.0}
    token = body["details"]["tokens"][0]
    assert token["policy_logprobs"]["helpful"] is None
    assert math.isclose(token["policy_logprobs"]["harmless"], token["logprob"], rel_tol=1e-5)


def test_weights_change_the_output_and_are_echoed_in_headers(client: TestClient) -> None:
    texts = set()
    for name in POLICIES:
        response = client.post(
            "/generate",
            json={"inputs": "Hello", "parameters": {"max_new_tokens": 8, "ignore_eos": True,
                                                      "weights": {name: 1.0}}},
        )  # fmt: skip
        assert response.headers["x-mpo-weights"].count("=1") == 1
        assert f"{name}=1" in response.headers["x-mpo-weights"]
        texts.add(response.json()["generated_text"])
    assert len(texts) > 1  # the random policies disagree


def test_stop_sequence(client: TestClient) -> None:
    free = generate(client, max_new_tokens=12, ignore_eos=True, details=True)
    tokens = [t["text"] for t in free["details"]["tokens"]]
    stop = next(t for t in tokens[1:] if re.fullmatch(r"\s?[A-Za-z]{2,}", t))  # a whole word
    body = generate(client, max_new_tokens=12, ignore_eos=True, stop=[stop], details=True)
    assert body["details"]["finish_reason"] == "stop_sequence"
    assert stop not in body["generated_text"]
    assert free["generated_text"].startswith(body["generated_text"])


def test_generate_stream(client: TestClient, policy_set: PolicySet) -> None:
    events = sse_events(
        client, "/generate_stream",
        {"inputs": "Hi", "parameters": {"max_new_tokens": 4, "details": True, "ignore_eos": True,
                                         "top_n_tokens": 2}},
    )  # fmt: skip
    assert [e["index"] for e in events] == [0, 1, 2, 3]
    assert all(e["generated_text"] is None for e in events[:-1])
    last = events[-1]
    prompt_tokens = len(policy_set.tokenizer.encode("Hi"))
    assert last["details"] == {
        "finish_reason": "length", "generated_tokens": 4, "prompt_tokens": prompt_tokens,
        "seed": None,
    }  # fmt: skip
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert all(len(e["top_tokens"]) == 2 for e in events)
    assert set(last["token"]["policy_logprobs"]) == set(POLICIES)
    assert last["mixing"]["strength"] == 1.0


def test_stream_matches_non_stream(client: TestClient) -> None:
    params = {"max_new_tokens": 6, "ignore_eos": True}
    whole = generate(client, **params)["generated_text"]
    events = sse_events(client, "/generate_stream", {"inputs": "Hello there", "parameters": params})
    assert events[-1]["generated_text"] == whole


def test_strength_uses_reference(client: TestClient) -> None:
    body = generate(client, max_new_tokens=2, strength=0.0, details=True)
    assert body["mixing"]["strength"] == 0.0
    # s = 0 samples the reference alone: no policy is run
    assert all(v is None for v in body["details"]["tokens"][0]["policy_logprobs"].values())


def test_tgi_bad_parameters(client: TestClient) -> None:
    cases = [
        ({"temperature": -0.5}, "parameters.temperature"),
        ({"top_p": 0}, "parameters.top_p"),
        ({"top_p": 1.5}, "parameters.top_p"),
        ({"max_new_tokens": 0}, "parameters.max_new_tokens"),
        ({"top_n_tokens": 999}, "parameters.top_n_tokens"),
        ({"weights": {"nobody": 1.0}}, "weights.nobody"),
        ({"weights": {"helpful": -1.0}}, "parameters.weights"),
        ({"weights": [1.0, 2.0]}, "weights"),
        ({"strength": -1}, "parameters.strength"),
        ({"unknown_knob": 1}, "parameters.unknown_knob"),
        ({"weights": {"helpful": 1.0}, "profile": "x"}, "weights"),
        ({"max_new_tokens": "many"}, "parameters.max_new_tokens"),
        ({"stop": [""]}, "parameters.stop"),
    ]
    for parameters, param in cases:
        response = client.post("/generate", json={"inputs": "Hi", "parameters": parameters})
        assert_error(response, 400, param=param)
    assert_error(client.post("/generate", json={"inputs": ""}), 400, param="inputs")
    assert_error(client.post("/generate", json={"parameters": {}}), 400, param="inputs")


def test_tgi_context_limit(client: TestClient) -> None:
    response = client.post(
        "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 10_000}}
    )
    assert_error(response, 400, param="parameters.max_new_tokens", text="context limit of 256")
    long_prompt = "word " * 400
    assert_error(client.post("/generate", json={"inputs": long_prompt}), 400, param="inputs",
                 text="context limit")  # fmt: skip
    # truncate keeps the prompt's tail, so the same prompt now fits
    ok = client.post(
        "/generate",
        json={"inputs": long_prompt, "parameters": {"truncate": 50, "max_new_tokens": 2}},
    )
    assert ok.status_code == 200, ok.text


def test_truncate_keeps_the_tail_of_the_prompt(client: TestClient, policy_set) -> None:
    head = "Numbers like 0 1 2 3 4 5 6 7 8 9 and symbols like ! ? , . : ; - work too."
    tail = " Could you please help me write a short poem about the sea?"
    tokenizer = policy_set.tokenizer
    keep = len(tokenizer.encode(tail))
    assert tokenizer.encode(head + tail)[-keep:] == tokenizer.encode(tail)

    def first_tokens(inputs: str, **parameters: object) -> tuple[list[int], list[float]]:
        parameters.update(max_new_tokens=4, ignore_eos=True, details=True)
        response = client.post("/generate", json={"inputs": inputs, "parameters": parameters})
        assert response.status_code == 200, response.text
        tokens = response.json()["details"]["tokens"]
        return [t["id"] for t in tokens], [t["logprob"] for t in tokens]

    ids, logprobs = first_tokens(head + tail, truncate=keep)
    tail_ids, tail_logprobs = first_tokens(tail)
    assert ids == tail_ids  # the model saw exactly the tail's tokens
    assert logprobs == pytest.approx(tail_logprobs, abs=1e-4)
    full_logprobs = first_tokens(head + tail)[1]  # and the context makes a difference
    assert full_logprobs != pytest.approx(tail_logprobs, abs=1e-3)

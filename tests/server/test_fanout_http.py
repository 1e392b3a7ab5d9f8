"""Fan-out over HTTP: one request, one choice per mixture (``mixtures``), on both APIs.
With a seed, choice i is token for token a separate request with mixture i."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from server_helpers import ADMIN, assert_error

MIXTURES = [
    {"weights": {"helpful": 1.0}},
    {"weights": {"helpful": 2.0, "concise": -1.0}, "plausibility": 0.2},
    {"weights": [1, 1, 1], "strength": 0.5},
]
SAMPLED = {"max_tokens": 6, "temperature": 1.0, "seed": 7, "logprobs": 2}


def completion(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/completions", json={"prompt": "Could you please", **body})
    assert response.status_code == 200, response.text
    return response.json()


def same_choice(one: dict, other: dict) -> None:
    assert one["text"] == other["text"]
    assert one["logprobs"]["tokens"] == other["logprobs"]["tokens"]
    assert one["logprobs"]["token_logprobs"] == pytest.approx(
        other["logprobs"]["token_logprobs"], abs=1e-5
    )


def test_choice_i_equals_a_separate_request_with_mixture_i(client: TestClient) -> None:
    fanned = completion(client, mixtures=MIXTURES, **SAMPLED)
    assert [c["index"] for c in fanned["choices"]] == [0, 1, 2]
    assert fanned["mixing"] is None  # a list: each choice has its own
    texts = set()
    for mixture, choice in zip(MIXTURES, fanned["choices"]):
        alone = completion(client, **mixture, **SAMPLED)
        same_choice(choice, alone["choices"][0])
        assert choice["mixing"] == alone["mixing"]
        texts.add(choice["text"])
    assert len(texts) > 1  # the mixtures do differ
    assert fanned["choices"][1]["mixing"]["plausibility"] == 0.2


def test_each_is_every_policy_alone_then_the_blend(client: TestClient) -> None:
    blend = {"weights": {"harmless": 1.0, "concise": 1.0}, "strength": 0.8}
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 3,
            "temperature": 1.0}  # fmt: skip
    fanned = client.post("/v1/chat/completions", json={**body, **blend, "mixtures": "each"})
    assert fanned.status_code == 200, fanned.text
    choices = fanned.json()["choices"]
    names = ["helpful", "harmless", "concise"]
    assert len(choices) == len(names) + 1
    for name, choice in zip(names, choices):
        assert choice["mixing"]["weights"][name] == 1.0
        alone = client.post("/v1/chat/completions", json={**body, "weights": {name: 1.0}})
        assert choice["message"] == alone.json()["choices"][0]["message"]
    assert choices[-1]["mixing"] == fanned.json()["mixing"]  # the request's own blend
    assert choices[-1]["mixing"]["weights"] == {"helpful": 0.0, "harmless": 0.5, "concise": 0.5}
    own = client.post("/v1/chat/completions", json={**body, **blend})
    assert choices[-1]["message"] == own.json()["choices"][0]["message"]


def test_a_profile_name_is_a_mixture_and_echo_scores_each(admin_client: TestClient) -> None:
    put = admin_client.put(
        "/admin/profiles/brief", json={"weights": {"concise": 1.0}}, headers=ADMIN
    )
    assert put.status_code == 201, put.text
    body = {"max_tokens": 2, "temperature": 0.0, "echo": True, "logprobs": 0}
    fanned = completion(admin_client, mixtures=["brief", {"weights": [1, 0, 0]}], **body)
    first, second = fanned["choices"]
    assert first["mixing"]["profile"] == "brief"
    alone = completion(admin_client, profile="brief", **body)["choices"][0]
    same_choice(first, alone)  # the echoed prompt's log-probs under that choice's mixture
    assert first["logprobs"]["token_logprobs"][1:3] != pytest.approx(
        second["logprobs"]["token_logprobs"][1:3], abs=1e-4
    )


def test_a_streamed_fanout_ends_each_choice_with_its_mixture(client: TestClient) -> None:
    body = {"prompt": "Hi", "max_tokens": 3, "stream": True, "mixtures": MIXTURES[:2]}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
    endings = {}
    for chunk in map(json.loads, lines):
        if "mixing" in chunk:
            endings[chunk["choices"][0]["index"]] = chunk["mixing"]["weights"]
    assert endings == {0: {"helpful": 1.0, "harmless": 0.0, "concise": 0.0},
                       1: {"helpful": 2.0, "harmless": 0.0, "concise": -1.0}}  # fmt: skip


def test_tgi_fanout_replies_in_best_of_sequences(client: TestClient) -> None:
    parameters = {"max_new_tokens": 5, "do_sample": True, "seed": 9, "details": True,
                  "mixtures": MIXTURES}  # fmt: skip
    body = client.post("/generate", json={"inputs": "Could you", "parameters": parameters})
    assert body.status_code == 200, body.text
    reply = body.json()
    others = reply["details"]["best_of_sequences"]
    assert len(others) == len(MIXTURES) - 1
    sequences = [(reply["generated_text"], reply["details"]["tokens"], reply["mixing"])]
    sequences += [(s["generated_text"], s["tokens"], s["mixing"]) for s in others]
    for mixture, (text, tokens, mixing) in zip(MIXTURES, sequences):
        single = {k: v for k, v in parameters.items() if k != "mixtures"} | mixture
        alone = client.post("/generate", json={"inputs": "Could you", "parameters": single})
        assert alone.json()["generated_text"] == text
        assert [t["id"] for t in alone.json()["details"]["tokens"]] == [t["id"] for t in tokens]
        assert alone.json()["mixing"] == mixing
    assert all(s["seed"] == 9 for s in others)


@pytest.mark.parametrize(
    ("body", "param", "text"),
    [
        ({"mixtures": MIXTURES, "n": 2}, "n", "number of choices"),
        ({"mixtures": MIXTURES, "weights": [1, 0, 0]}, "weights", "with mixtures"),
        ({"mixtures": [{"weights": {"helpful": -1}}]}, "mixtures", "sum to more than 0"),
        ({"mixtures": [{}, {"weights": {"nobody": 1}}]}, "mixtures.1.weights.nobody", ""),
        ({"mixtures": [{"plausibility": 1}]}, "mixtures", ""),
        ({"mixtures": []}, "mixtures", ""),
        ({"mixtures": "all"}, "mixtures", ""),
        ({"mixtures": [{}] * 9}, "mixtures", "at most 8"),
    ],
)
def test_bad_fanouts_are_400s_naming_the_parameter(
    client: TestClient, body: dict, param: str, text: str
) -> None:
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, **body})
    error = assert_error(response, 400, text=text)
    assert error["param"].startswith(param)
    if param == "n":  # TGI has no n
        return
    tgi = client.post("/generate", json={"inputs": "Hi", "parameters": {"details": True, **body}})
    error = assert_error(tgi, 400, text=text)
    assert error["param"].startswith(param if param == "weights" else f"parameters.{param}")


def test_tgi_fanout_needs_details_and_does_not_stream(client: TestClient) -> None:
    body = {"inputs": "Hi", "parameters": {"mixtures": MIXTURES}}
    assert_error(client.post("/generate", json=body), 400, param="parameters.mixtures",
                 text="details")  # fmt: skip
    streamed = {"inputs": "Hi", "parameters": {"mixtures": MIXTURES, "details": True}}
    assert_error(client.post("/generate_stream", json=streamed), 400,
                 param="parameters.mixtures", text="not supported when streaming")  # fmt: skip

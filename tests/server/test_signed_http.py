"""Signed weights and the plausibility constraint over HTTP: what a reply reports, that its
log-probs are the engine's for that mixture, 400s naming the parameter on both APIs, and
profiles that a bad PUT leaves as they were."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_helpers import ADMIN, assert_error

from mpo_core.engine.core import Engine

SIGNED = {"helpful": 2.0, "concise": -1.0}


def test_a_signed_mixture_is_served_and_reported_on_both_apis(
    client: TestClient, engine: Engine
) -> None:
    inputs = "Could you please help me"
    parameters = {"max_new_tokens": 6, "weights": SIGNED, "plausibility": 0.2, "seed": 4,
                  "do_sample": True, "details": True}  # fmt: skip
    body = client.post("/generate", json={"inputs": inputs, "parameters": parameters}).json()
    mixing = body["mixing"]
    assert mixing["weights"] == {"helpful": 2.0, "harmless": 0.0, "concise": -1.0}
    assert mixing["plausibility"] == 0.2 and mixing["strength"] == 1.0
    # The served log-probs are the final (constrained) distribution's: the engine's own
    # teacher-forced log-probs of the same tokens under the same mixture.
    prompt = list(engine.tokenizer.encode(inputs))
    reply = [t["id"] for t in body["details"]["tokens"]]
    mixture = engine.mixture(SIGNED, 1.0, 0.2)
    scored = engine.prompt_logprobs(prompt + reply, mixture).result().logprobs[len(prompt) :]
    served = [t["logprob"] for t in body["details"]["tokens"]]
    assert served == pytest.approx(scored, abs=1e-4)
    unconstrained = engine.prompt_logprobs(prompt + reply, engine.mixture(SIGNED, 1.0, 0.0))
    assert served != pytest.approx(unconstrained.result().logprobs[len(prompt) :], abs=1e-4)

    chat = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
              "weights": [3, 0, -1], "strength": 0.5},
    ).json()  # fmt: skip
    assert chat["mixing"]["weights"] == {"helpful": 1.5, "harmless": 0.0, "concise": -0.5}
    assert chat["mixing"]["plausibility"] == 0.1  # the default, in force: a negative term
    plain = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).json()
    assert plain["mixing"]["plausibility"] == 0.0  # no negative term: no constraint


BAD = [
    ({"weights": {"helpful": -1.0}}, "weights", "sum to more than 0"),
    ({"weights": {"helpful": 1.0, "concise": -1.0}}, "weights", "sum to more than 0"),
    ({"weights": [1.0, 0.0, -0.95]}, "weights", "once the weights are normalised"),
    ({"weights": {"nobody": 1.0, "helpful": -0.5}}, "weights.nobody", "unknown policy"),
    ({"weights": SIGNED, "plausibility": 1.0}, "plausibility", ""),
    ({"weights": SIGNED, "plausibility": -0.1}, "plausibility", ""),
    ({"plausibility": "high"}, "plausibility", ""),
]


@pytest.mark.parametrize(("fields", "param", "text"), BAD)
def test_bad_signed_input_is_a_400_naming_the_parameter_on_both_apis(
    client: TestClient, fields: dict, param: str, text: str
) -> None:
    tgi = client.post("/generate", json={"inputs": "Hi", "parameters": fields})
    error = assert_error(tgi, 400, text=text)
    assert error["param"] in (param, f"parameters.{param}")
    openai = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, **fields})
    assert_error(openai, 400, param=param, text=text)


def test_profiles_take_signed_weights_and_a_bad_put_changes_nothing(
    admin_client: TestClient,
) -> None:
    def put(body: dict) -> TestClient:
        return admin_client.put("/admin/profiles/guide", json=body, headers=ADMIN)

    assert put({"weights": SIGNED, "strength": 1.0}).status_code in (200, 201)
    stored = admin_client.get("/admin/profiles/guide", headers=ADMIN).json()
    for weights, param, text in [
        ({"helpful": 1.0, "concise": -1.0}, "weights", "sum to more than 0"),
        ({"helpful": 1.0, "concise": -0.95}, "weights", "weights.helpful is 20"),
        ({"ghost": 2.0, "helpful": -1.0}, "weights.ghost", "ghost"),
    ]:
        assert_error(put({"weights": weights}), 400, param=param, text=text)
        assert admin_client.get("/admin/profiles/guide", headers=ADMIN).json() == stored
    reply = admin_client.post(
        "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 1, "profile": "guide", "plausibility": 0.3},
    ).json()
    assert reply["mixing"]["weights"]["concise"] == -1.0
    assert reply["mixing"]["plausibility"] == 0.3 and reply["mixing"]["profile"] == "guide"

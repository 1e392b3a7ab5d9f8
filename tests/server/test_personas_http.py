"""Request personas over HTTP (issue 34.2): on a persona family a request's own persona,
given the prompt of a configured persona, answers exactly as that persona does on both
APIs and in a fan-out; bad input is a 400 naming the parameter and stores nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator
from server_helpers import ADMIN, ADMIN_TOKEN, ClientFactory, assert_error

from mpo_core.config import load_config
from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.runners import load_policy_set
from mpo_core.testing.families import PERSONAS, make_persona_family

BRIEF = PERSONAS["brief"]["system"]
THANKS = PERSONAS["thanks"]["prefix"]
CHAT = {
    "messages": [{"role": "user", "content": "Could you please help me write a poem?"}],
    "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": True,
}  # fmt: skip


@pytest.fixture(scope="module")
def persona_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    folder = tmp_path_factory.mktemp("persona-http")
    policy_set = load_policy_set(load_config(make_persona_family(folder)))
    engine = Engine(policy_set, EngineLimits(max_running=8, max_request_personas=2)).start()
    yield engine
    engine.stop(timeout=5)


@pytest.fixture
def personas_client(make_client: ClientFactory, persona_engine: Engine) -> TestClient:
    return make_client(engine_override=persona_engine, admin_token=ADMIN_TOKEN)


def chat(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={**CHAT, **body})
    assert response.status_code == 200, response.text
    return response.json()


def tokens_of(choice: dict[str, Any]) -> list[tuple[str, float]]:
    return [(t["token"], t["logprob"]) for t in choice["logprobs"]["content"]]


def same(one: list[tuple[str, float]], other: list[tuple[str, float]]) -> None:
    assert [t for t, _ in one] == [t for t, _ in other]
    assert [lp for _, lp in one] == pytest.approx([lp for _, lp in other], abs=1e-5)


def test_openai_request_persona_equals_the_configured_one(personas_client: TestClient) -> None:
    mine = chat(
        personas_client,
        weights={"cheerful": 0.4, "teacher": 0.6},
        strength=0.7,
        personas={"teacher": BRIEF},
    )
    theirs = chat(personas_client, weights={"cheerful": 0.4, "brief": 0.6}, strength=0.7)
    same(tokens_of(mine["choices"][0]), tokens_of(theirs["choices"][0]))
    assert mine["mixing"]["weights"]["teacher"] == pytest.approx(0.6)
    first = mine["choices"][0]["logprobs"]["content"][0]["policy_logprobs"]
    twin = theirs["choices"][0]["logprobs"]["content"][0]["policy_logprobs"]
    assert first["teacher"] == pytest.approx(twin["brief"], abs=1e-5)
    assert first["brief"] is None  # not in this mixture: not run


def test_tgi_request_persona_equals_the_configured_one(personas_client: TestClient) -> None:
    base = {"max_new_tokens": 5, "details": True, "ignore_eos_token": True}
    body: dict[str, Any] = {"inputs": "Hello there"}
    mine = personas_client.post(
        "/generate",
        json={
            **body,
            "parameters": {
                **base, "weights": {"grateful": 1.0}, "personas": {"grateful": {"prefix": THANKS}},
            },
        },
    )  # fmt: skip
    theirs = personas_client.post(
        "/generate", json={**body, "parameters": {**base, "weights": {"thanks": 1.0}}}
    )
    assert mine.status_code == 200, mine.text
    a, b = mine.json()["details"]["tokens"], theirs.json()["details"]["tokens"]
    assert [t["id"] for t in a] == [t["id"] for t in b]
    assert [t["logprob"] for t in a] == pytest.approx([t["logprob"] for t in b], abs=1e-5)
    assert mine.json()["generated_text"] == theirs.json()["generated_text"]


def test_fan_out_each_runs_every_persona_alone_then_the_blend(
    personas_client: TestClient,
) -> None:
    own = {"teacher": BRIEF}
    blend = {"weights": {"cheerful": 1.0, "teacher": 1.0}, "personas": own}
    fanned = chat(personas_client, mixtures="each", **blend)["choices"]
    names = ["cheerful", "brief", "thanks", "teacher"]
    assert len(fanned) == len(names) + 1
    for name, choice in zip(names, fanned):
        assert choice["mixing"]["weights"][name] == 1.0
    same(tokens_of(fanned[3]), tokens_of(fanned[1]))  # teacher alone = brief alone
    same(tokens_of(fanned[-1]), tokens_of(chat(personas_client, **blend)["choices"][0]))
    # A list of mixtures: each item may bring its own.
    listed = chat(personas_client, mixtures=[{"weights": {"teacher": 1.0}, "personas": own}, {}])
    same(tokens_of(listed["choices"][0]), tokens_of(fanned[1]))


def test_the_schema_admits_personas_on_a_persona_family(personas_client: TestClient) -> None:
    document = personas_client.get("/openapi.json").json()
    validator = Draft202012Validator(
        {"$ref": "#/components/schemas/ChatCompletionRequest", "components": document["components"]}
    )
    good = {**CHAT, "weights": {"teacher": 1.0}, "personas": {"teacher": BRIEF}}
    assert validator.is_valid(good)
    assert not validator.is_valid({**CHAT, "personas": {"a": "x", "b": "y", "c": "z"}})  # limit 2
    assert not validator.is_valid({**CHAT, "personas": {"t": {"system": "a", "prefix": "b"}}})
    chat(personas_client, **{k: v for k, v in good.items() if k not in CHAT})


@pytest.mark.parametrize(
    "personas, param",
    [
        ({"a": "x", "b": "y", "c": "z"}, "personas"),  # over this engine's limit of 2
        ({"brief": "x"}, "personas.brief"),  # a configured persona's name
        ({"base": "x"}, "personas.base"),  # the plain model's
        ({"bad name": "x"}, "personas"),
        ({"t": {"system": "a", "prefix": "b"}}, "personas.t"),
        ({"t": ""}, "personas.t"),
        ({"t": 3}, "personas.t"),
    ],
)
def test_bad_personas_are_400_naming_the_parameter(
    personas_client: TestClient, personas: Any, param: str
) -> None:
    body = {**CHAT, "personas": personas}
    assert_error(personas_client.post("/v1/chat/completions", json=body), 400, param=param)
    tgi = {"inputs": "Hi", "parameters": {"max_new_tokens": 1, "personas": personas}}
    error = assert_error(personas_client.post("/generate", json=tgi), 400)
    assert error["param"] in (param, f"parameters.{param}")  # as TGI's other mixing errors
    fan = {**CHAT, "mixtures": [{"personas": personas}]}
    assert_error(
        personas_client.post("/v1/chat/completions", json=fan), 400, param=f"mixtures.0.{param}"
    )


def test_weights_naming_a_persona_the_request_does_not_bring(
    personas_client: TestClient,
) -> None:
    body = {**CHAT, "weights": {"teacher": 1.0}, "personas": {"tutor": BRIEF}}
    response = personas_client.post("/v1/chat/completions", json=body)
    assert_error(response, 400, param="weights.teacher", text="unknown policy")


def test_a_family_without_personas_refuses_them(client: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = client.post("/v1/chat/completions", json={**body, "personas": {"t": "Be kind."}})
    assert_error(response, 400, param="personas", text="persona family")
    tgi = {"inputs": "Hi", "parameters": {"max_new_tokens": 1, "personas": {"t": "x"}}}
    error = assert_error(client.post("/generate", json=tgi), 400)
    assert error["param"] in ("personas", "parameters.personas")
    assert client.post("/v1/chat/completions", json={**body, "personas": {}}).status_code == 200
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["ChatCompletionRequest"]["properties"]["personas"]["anyOf"][0] == {
        "type": "object", "maxProperties": 0,
    }  # fmt: skip


def test_a_profile_brings_its_personas(personas_client: TestClient) -> None:
    """A stored profile keeps its personas: a request naming it decodes as the configured
    twin does; a rollback takes the old version's personas; a request adds its own."""
    body = {"weights": {"cheerful": 0.4, "teacher": 0.6}, "strength": 0.7,
            "personas": {"teacher": BRIEF}}  # fmt: skip
    created = personas_client.put("/admin/profiles/tutor", json=body, headers=ADMIN)
    assert created.status_code == 201, created.text
    assert created.json()["personas"] == {"teacher": BRIEF}
    mine = chat(personas_client, profile="tutor")
    theirs = chat(personas_client, weights={"cheerful": 0.4, "brief": 0.6}, strength=0.7)
    same(tokens_of(mine["choices"][0]), tokens_of(theirs["choices"][0]))
    assert mine["mixing"]["profile"] == "tutor"
    plain = {"weights": {"cheerful": 1.0}}
    assert (
        personas_client.put("/admin/profiles/tutor", json=plain, headers=ADMIN).json()["personas"]
        == {}
    )
    back = personas_client.put("/admin/profiles/tutor", json={"version": 1}, headers=ADMIN)
    assert back.json()["personas"] == {"teacher": BRIEF}
    # The request's own persona beside the profile's (weight 0 there: not run).
    both = chat(personas_client, profile="tutor", personas={"grateful": {"prefix": THANKS}})
    assert both["mixing"]["weights"]["grateful"] == 0.0


@pytest.mark.parametrize(
    "personas, param",
    [({"brief": "x"}, "personas.brief"), ({"a": "x", "b": "y", "c": "z"}, "personas"),
     ({"bad name": "x"}, "personas")],
)  # fmt: skip
def test_a_bad_profile_put_stores_nothing(
    personas_client: TestClient, personas: Any, param: str
) -> None:
    body = {"weights": {"brief": 1.0}, "personas": personas}
    response = personas_client.put("/admin/profiles/badpersonas", json=body, headers=ADMIN)
    assert_error(response, 400, param=param)
    assert personas_client.get("/admin/profiles/badpersonas", headers=ADMIN).status_code == 404


def test_a_profile_put_with_personas_elsewhere_stores_nothing(
    make_client: ClientFactory,
) -> None:
    admin = make_client(admin_token=ADMIN_TOKEN)  # the tiny family: separate models
    body = {"weights": {"helpful": 1.0}, "personas": {"teacher": BRIEF}}
    response = admin.put("/admin/profiles/withpersonas", json=body, headers=ADMIN)
    assert_error(response, 400, param="personas")
    assert admin.get("/admin/profiles/withpersonas", headers=ADMIN).status_code == 404


def test_metrics_count_the_openings(personas_client: TestClient) -> None:
    def count(result: str) -> float:
        text = personas_client.get("/metrics").text
        line = f'mpo_request_persona_openings_total{{result="{result}"}}'
        found = [row for row in text.splitlines() if row.startswith(line)]
        assert found, text[-2000:]
        return float(found[0].split()[-1])

    own = {"weights": {"sailor": 1.0}, "personas": {"sailor": "Speak like an old sailor."}}
    hits, misses = count("hit"), count("miss")
    chat(personas_client, **own)
    chat(personas_client, **own)
    assert count("miss") == misses + 1
    assert count("hit") == hits + 1

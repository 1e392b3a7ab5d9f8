"""Every text field of every request model meets the one text rule (``mpo_core/rules.py``).

The test walks the request models themselves (pydantic's field annotations, reached from
the OpenAPI document's request bodies), so a field added later is covered without editing
it: each string it can reach (a field, a list item, a dict key, a string inside a JSON
object) gets a lone surrogate, is posted over HTTP, and must be a 400 naming that field.
Names (profiles, adapters, ``model``) also obey the name rule: a 400, never a 404.
"""

from __future__ import annotations

import copy
import json
import types
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from fastapi.testclient import TestClient
from pydantic import BaseModel
from server_helpers import ADMIN, assert_error

from server.protocol import admin, fit, openai, tgi

LONE = "a\ud800b"  # a lone surrogate between two letters
JSON = {"content-type": "application/json", **ADMIN}

# A valid body of each model (nested models too: their fields are filled in one at a time).
BASES: dict[str, dict[str, Any]] = {
    "TGIRequest": {"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
    "TGIParameters": {},
    "CompletionRequest": {"prompt": "Hi", "max_tokens": 1},
    "ChatCompletionRequest": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    "ChatMessage": {"role": "user", "content": "Hi"},
    "TextPart": {"type": "text", "text": "Hi"},
    "StreamOptions": {},
    "ProfilePut": {"weights": {"helpful": 1.0}},
    "MixtureSpec": {},  # an item of a fan-out's mixtures
    "PersonaPrompt": {"system": "Be brief."},  # a persona the request brings
    "DefaultPut": {"default": None},
    "FitRequest": {"prompts": ["Hi"], "iterations": 1, "max_new_tokens": 1},
}
# Fields that exclude another one: giving the first drops the second from the base.
EXCLUSIVE = {("FitRequest", "prompt_file"): "prompts", ("PersonaPrompt", "prefix"): "system"}
MODELS: dict[str, type[BaseModel]] = {
    name: value
    for module in (tgi, openai, admin, fit)
    for name, value in vars(module).items()
    if isinstance(value, type) and issubclass(value, BaseModel)
}


def _sample(tp: Any) -> Any:
    """Some valid-looking value of a simple type (a dict's values beside the bad key)."""
    return {float: 1.0, int: 1, bool: True}.get(tp, "x")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def text_variants(tp: Any, base: Any = None) -> Iterator[tuple[str, Any]]:
    """(dotted field path, a value of type ``tp`` with one string made a lone surrogate),
    for every string position of ``tp``; built on ``base`` where it has the container."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        yield from text_variants(args[0], base)
    elif tp is str or tp is Any:
        yield "", LONE
    elif origin is Literal or tp is type(None) or tp in (int, float, bool):
        return  # enumerations and numbers hold no free text
    elif origin in (Union, types.UnionType):
        for member in args:
            yield from text_variants(member, base)
    elif origin is list:
        item = base[0] if isinstance(base, list) and base else None
        for path, value in text_variants(args[0], item):
            yield _join("0", path), [value]
    elif origin is dict:
        key, value_type = args
        if list(text_variants(key)):
            yield "", {LONE: _sample(value_type)}
        for path, value in text_variants(value_type):
            yield ("" if value_type is Any else _join("k", path)), {"k": value}
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        body = base if isinstance(base, dict) else BASES[tp.__name__]
        for name, field in tp.model_fields.items():
            for path, value in text_variants(field.annotation, body.get(name)):
                changed = {**copy.deepcopy(body), name: value}
                changed.pop(EXCLUSIVE.get((tp.__name__, name), ""), None)
                yield _join(name, path), changed
    else:
        raise AssertionError(f"the walk does not know the type {tp!r}: teach it")


def _request_bodies(client: TestClient) -> list[tuple[str, str, type[BaseModel]]]:
    """(method, path, model) of every operation that reads a JSON body."""
    found = []
    for path, item in client.app.openapi()["paths"].items():  # type: ignore[attr-defined]
        for method, operation in item.items():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None:
                continue
            name = body["schema"]["$ref"].rsplit("/", 1)[-1]
            assert name in MODELS and name in BASES, f"{method} {path}: add {name} to BASES"
            found.append((method.upper(), path.replace("{name}", "p1"), MODELS[name]))
    return found


def test_every_text_field_of_every_request_model_refuses_a_lone_surrogate(
    admin_client: TestClient,
) -> None:
    operations = _request_bodies(admin_client)
    assert {path for _, path, _ in operations} >= {
        "/generate", "/v1/completions", "/v1/chat/completions", "/admin/profiles/p1",
        "/admin/fit",
    }  # fmt: skip
    walked: set[str] = set()
    for method, path, model in operations:
        for field, body in text_variants(model):
            walked.add(field)
            response = admin_client.request(method, path, content=json.dumps(body), headers=JSON)
            where = f"{method} {path} {field}"
            assert response.status_code == 400, (where, response.text)
            error = response.json()["error"]
            param = error["param"] or ""
            assert param == field or param.startswith(field + "."), (where, error)
            assert "unicode" in error["message"].lower(), (where, error)
    # the walk reached the fields the issue names (a sanity check that it walks at all)
    assert walked >= {
        "inputs", "parameters.stop.0", "parameters.weights", "parameters.profile",
        "parameters.grammar", "parameters.adapter_id", "parameters.response_format",
        "prompt", "stop", "stop.0", "user", "model", "logit_bias", "response_format",
        "messages.0.name", "messages.0.content", "messages.0.content.0.text", "tools.0",
        "weights", "profile", "meta", "default", "prompts.0", "prompt_file", "rewards",
    }, walked  # fmt: skip


def test_odd_adapter_and_model_names_are_a_400_naming_the_field(client: TestClient) -> None:
    """A control character or a name past 64 characters breaks the name rule: a 400 naming
    ``adapter_id`` or ``model``; a well-formed name that is not loaded stays a 404."""
    long = "a" * 65
    for name in ("con\x01cise", long, "a" * 128, "bad name"):
        tgi_body = {"inputs": "Hi", "parameters": {"max_new_tokens": 1, "adapter_id": name}}
        response = client.post("/generate", json=tgi_body)
        assert_error(response, 400, param="parameters.adapter_id")
        chat = {"messages": [{"role": "user", "content": "Hi"}], "model": name, "max_tokens": 1}
        assert_error(client.post("/v1/chat/completions", json=chat), 400, param="model")
    for model in (f"tiny:{long}", f"tiny/{long}", "tiny:a:b"):
        chat = {"messages": [{"role": "user", "content": "Hi"}], "model": model, "max_tokens": 1}
        assert_error(client.post("/v1/chat/completions", json=chat), 400, param="model")
    missing = {"inputs": "Hi", "parameters": {"max_new_tokens": 1, "adapter_id": "nope"}}
    error = assert_error(client.post("/generate", json=missing), 404, param="parameters.adapter_id")
    assert error["code"] == "adapter_not_found"
    chat = {"messages": [{"role": "user", "content": "Hi"}], "model": "tiny/nope"}
    assert_error(client.post("/v1/chat/completions", json=chat), 404, param="model")


def test_an_error_quoting_a_lone_surrogate_is_still_a_json_400(client: TestClient) -> None:
    """The body is UTF-8: a surrogate quoted in a message or a field's name is escaped."""
    body = '{"inputs": "Hi", "parameters": {"a\\ud800": 1}}'
    response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    error = assert_error(response, 400, text="unicode")
    assert error["param"] == "parameters"

"""Each request rule is written once: every entry point that uses it answers alike.

The rules live in ``mpo_core/rules.py`` (token ids in the vocabulary, prompt + new tokens
in the context) and ``server/protocol/common.py`` (text that is valid Unicode). One test
per rule, through each entry point that applies it; the message must be the rule's own.
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from server_helpers import ADMIN, assert_error

from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, GenerationRequest
from mpo_core.errors import InvalidParameter
from server.protocol.openai import ChatCompletionRequest, CompletionRequest, TextPart

LONE = '"a\\ud800b"'  # JSON for a string holding a lone surrogate
JSON = {"content-type": "application/json"}


def test_context_limit_is_one_rule_at_every_entry_point(
    admin_client: TestClient, engine: Engine
) -> None:
    limit = engine.max_context
    too_many = limit + 1
    expected = f"exceeds the context limit of {limit} tokens"
    http = [
        ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": too_many}},
         "parameters.max_new_tokens"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": too_many}, "max_tokens"),
        ("/v1/chat/completions",
         {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": too_many},
         "max_completion_tokens"),
        ("/admin/fit", {"prompts": ["Hi"], "max_new_tokens": too_many, "iterations": 1},
         "max_new_tokens"),
    ]  # fmt: skip
    for path, body, param in http:
        response = admin_client.post(path, json=body, headers=ADMIN)
        error = assert_error(response, 400, param=param, text=expected)
        assert f"+ {param} ({too_many})" in error["message"], error
    with pytest.raises(InvalidParameter, match=expected) as err:
        engine.submit(GenerationRequest([5, 6], SamplingParams(max_new_tokens=too_many)))
    assert err.value.param == "max_new_tokens"
    # a prompt that fills the context on its own names the prompt, whatever the entry point
    full = [5] * limit
    no_room = "which leaves no room to generate"
    response = admin_client.post("/v1/completions", json={"prompt": full, "max_tokens": 1})
    assert_error(response, 400, param="prompt", text=no_room)
    with pytest.raises(InvalidParameter, match=no_room) as err:
        engine.submit(GenerationRequest(full, SamplingParams(max_new_tokens=1)))
    assert err.value.param == "prompt"


def test_vocabulary_range_is_one_rule_at_every_entry_point(
    client: TestClient, engine: Engine
) -> None:
    vocab = engine.policy_set.vocab_size
    expected = f"token id {vocab} is outside the vocabulary [0, {vocab})"
    response = client.post("/v1/completions", json={"prompt": [5, vocab], "max_tokens": 1})
    assert_error(response, 400, param="prompt", text=expected)
    calls = [
        ("prompt", lambda: engine.submit(GenerationRequest([5, vocab], SamplingParams(1)))),
        ("stop_token_ids",
         lambda: engine.submit(GenerationRequest([5], SamplingParams(1, stop_token_ids=[vocab])))),
        ("prompts", lambda: engine.score([[vocab]], [[5]])),
        ("completions", lambda: engine.score([[5]], [[6, vocab]])),
    ]  # fmt: skip
    for param, call in calls:
        with pytest.raises(InvalidParameter, match=re.escape(expected)) as err:
            call()
        assert err.value.param == param
        assert str(err.value).startswith(f"{param}: ")


def test_lone_surrogate_is_one_rule_at_every_entry_point(client: TestClient) -> None:
    expected = "not valid Unicode: lone surrogate at position 1"
    bodies = {
        "/generate": ('{"inputs": LONE}', "inputs"),
        "/v1/completions": ('{"prompt": LONE, "max_tokens": 1}', "prompt"),
        "/v1/chat/completions": (
            '{"messages": [{"role": "user", "content": LONE}], "max_tokens": 1}',
            "messages.0.content",
        ),
    }
    for path, (body, param) in bodies.items():  # HTTP: the JSON decoder may refuse it first
        response = client.post(path, content=body.replace("LONE", LONE), headers=JSON)
        assert_error(response, 400, param=param)
    text = "a\ud800b"
    models = [
        (CompletionRequest, {"prompt": text}, "prompt"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": text}]}, "messages"),
        (TextPart, {"type": "text", "text": text}, "text"),
    ]  # a body given as Python objects meets the request models' rule
    for model, body, field in models:
        with pytest.raises(ValidationError, match=expected) as invalid:
            model.model_validate(body)
        assert invalid.value.errors()[0]["loc"][0] == field
    # text made after validation (a chat template's output) meets the same rule
    serving = client.app.state.serving  # type: ignore[attr-defined]
    with pytest.raises(InvalidParameter, match=expected) as err:
        serving.encode(text, "messages")
    assert err.value.param == "messages"

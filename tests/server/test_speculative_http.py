"""Speculative decoding over HTTP: greedy replies identical with it on and off (TGI and
OpenAI, whole and streamed), the per-request opt-out, the reply's counts in TGI details
and OpenAI usage, the Prometheus counters, and the ``--speculative`` flag."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_helpers import ClientFactory, assert_error, sse_events

from mpo_core.config import SpeculativeConfig, load_config
from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.models.policies import PolicySet
from server import cli

LOOP = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the"


@pytest.fixture(scope="module")
def spec_engine(policy_set: PolicySet) -> Iterator[Engine]:
    settings = SpeculativeConfig(method="ngram")
    engine = Engine(policy_set, EngineLimits(max_running=8), speculative=settings).start()
    yield engine
    engine.stop(timeout=5)


def _tgi(client: TestClient, **parameters: object) -> dict:
    body = {"inputs": LOOP, "parameters": {"max_new_tokens": 40, "details": True, **parameters}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_replies_are_identical_over_http(
    client: TestClient, make_client: ClientFactory, spec_engine: Engine
) -> None:
    spec = make_client(engine_override=spec_engine)
    mixes = [{}, {"weights": {"helpful": 1.0}}, {"weights": [0.2, 0.3, 0.5], "strength": 0.6}]
    accepted = 0
    for mix in mixes:
        off = _tgi(client, ignore_eos=True, max_new_tokens=100, **mix)
        on = _tgi(spec, ignore_eos=True, max_new_tokens=100, **mix)
        assert on["generated_text"] == off["generated_text"]
        assert [t["id"] for t in on["details"]["tokens"]] == [
            t["id"] for t in off["details"]["tokens"]
        ]
        assert "drafted_tokens" not in off["details"]  # speculation off: no counts
        assert on["details"]["accepted_tokens"] <= on["details"]["drafted_tokens"]
        accepted += on["details"]["accepted_tokens"]
    assert accepted > 0  # speculation really ran

    chat = {
        "messages": [{"role": "user", "content": LOOP}],
        "max_tokens": 30,
        "temperature": 0,
        "ignore_eos": True,
    }
    off = client.post("/v1/chat/completions", json=chat).json()
    on = spec.post("/v1/chat/completions", json=chat).json()
    assert on["choices"][0]["message"] == off["choices"][0]["message"]
    assert "completion_tokens_details" not in off["usage"]
    counts = on["usage"]["completion_tokens_details"]
    assert counts["accepted_prediction_tokens"] >= 0 and counts["rejected_prediction_tokens"] >= 0

    stream = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(spec, "/v1/chat/completions", stream)
    text = "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events[:-1]
        if isinstance(e, dict) and e["choices"]
    )
    assert text == off["choices"][0]["message"]["content"]
    usage = [e for e in events if isinstance(e, dict) and e.get("usage")][-1]["usage"]
    assert set(usage["completion_tokens_details"]) == {
        "accepted_prediction_tokens",
        "rejected_prediction_tokens",
    }

    tgi_stream = {"inputs": LOOP, "parameters": {"max_new_tokens": 40, "details": True}}
    last = sse_events(spec, "/generate_stream", tgi_stream)[-1]
    assert last["generated_text"] == _tgi(client)["generated_text"]
    assert last["details"]["accepted_tokens"] <= last["details"]["drafted_tokens"]


def test_a_request_opts_out_and_counters_add_up(
    make_client: ClientFactory, spec_engine: Engine
) -> None:
    spec = make_client(engine_override=spec_engine)

    def counter(name: str) -> float:
        for line in spec.get("/metrics").text.splitlines():
            if line.startswith(name + "_total "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not exported")

    before = counter("mpo_speculative_drafted_tokens"), counter("mpo_speculative_accepted_tokens")
    details = _tgi(spec, ignore_eos=True, speculative=False)["details"]
    assert details["drafted_tokens"] == details["accepted_tokens"] == 0
    details = _tgi(spec, ignore_eos=True)["details"]
    after = counter("mpo_speculative_drafted_tokens"), counter("mpo_speculative_accepted_tokens")
    assert after[0] - before[0] == details["drafted_tokens"] > 0
    assert after[1] - before[1] == details["accepted_tokens"]
    completion = {"prompt": LOOP, "max_tokens": 20, "temperature": 0, "speculative": False}
    usage = spec.post("/v1/completions", json=completion).json()["usage"]
    assert usage["completion_tokens_details"] == {
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    }


def test_bad_speculative_field_is_a_400_naming_it(client: TestClient) -> None:
    body = {"inputs": "hi", "parameters": {"speculative": "yes"}}
    assert_error(client.post("/generate", json=body), 400, param="parameters.speculative")
    bad = {"prompt": "hi", "speculative": 1}
    assert_error(client.post("/v1/completions", json=bad), 400, param="speculative")


def test_speculative_flag_overrides_the_policy_set(tiny_yaml: Path) -> None:
    from server.app import policy_config

    args = cli.build_parser().parse_args(
        ["serve", "--config", str(tiny_yaml), "--speculative", "ngram"]
    )
    settings = cli.settings_from_args(args)
    assert settings.speculative == "ngram"
    assert load_config(tiny_yaml).speculative.method == "off"
    assert policy_config(settings).speculative.method == "ngram"
    assert policy_config(settings).speculative.max_draft_tokens == 4  # the rest is kept

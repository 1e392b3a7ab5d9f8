"""Health, info, metrics, and the error classes every route shares."""

from __future__ import annotations

import threading
from typing import Any

from fastapi.testclient import TestClient
from server_helpers import ClientFactory, assert_error, metric_value

from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.models.policies import PolicySet

GEN = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}


def test_health_and_info(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    info = client.get("/info").json()
    assert info["policies"] == ["helpful", "harmless", "concise"]
    assert info["reference"] == "base"
    assert info["adapters"] is None  # a family of full models
    assert info["vocab_size"] == 320
    assert info["limits"]["max_context"] == 256
    assert info["limits"]["prefill_chunk_tokens"] == EngineLimits().prefill_chunk_tokens
    assert info["profiles"] == [] and info["default_profile"] is None
    assert isinstance(info["version"], str)


def test_health_503_when_engine_loop_is_dead(
    make_client: ClientFactory, policy_set: PolicySet
) -> None:
    own = Engine(policy_set, EngineLimits(max_running=1, max_queued=1))
    client = make_client(engine_override=own)  # the lifespan starts it
    assert client.get("/health").status_code == 200
    own.stop(timeout=1)
    assert_error(client.get("/health"), 503)
    error = assert_error(client.post("/generate", json=GEN), 503)
    assert error["code"] == "engine_not_running"


def test_metrics(client: TestClient) -> None:
    client.post(
        "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3, "ignore_eos": True}}
    )
    client.post("/generate", json={"inputs": "Hi", "parameters": {"temperature": -1}})
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
    text = client.get("/metrics").text
    assert metric_value(text, "mpo_requests_total", {"route": "/generate", "status": "200"}) == 1
    assert metric_value(text, "mpo_requests_total", {"route": "/generate", "status": "400"}) == 1
    assert (
        metric_value(text, "mpo_requests_total", {"route": "/v1/completions", "status": "200"}) == 1
    )
    assert metric_value(text, "mpo_generation_tokens_total") >= 4
    assert metric_value(text, "mpo_prompt_tokens_total") >= 2
    assert metric_value(text, "mpo_time_to_first_token_seconds_count") == 2
    assert metric_value(text, "mpo_inter_token_latency_seconds_count") >= 2
    assert metric_value(text, "mpo_e2e_request_latency_seconds_count") == 2
    assert metric_value(text, "mpo_batch_size_count") >= 3
    for policy in ("helpful", "harmless", "concise"):
        assert metric_value(text, "mpo_policy_forward_seconds_count", {"policy": policy}) >= 1
    assert metric_value(text, "mpo_requests_by_profile_total", {"profile": "uniform"}) == 2
    assert metric_value(text, "mpo_num_requests_running") == 0
    assert metric_value(text, "mpo_num_requests_waiting") == 0
    assert 'mpo_fit_jobs{state="queued"} 0.0' in text


def test_two_apps_have_separate_registries(make_client: ClientFactory) -> None:
    a, b = make_client(), make_client()
    a.get("/info")
    text_b = b.get("/metrics").text
    assert metric_value(text_b, "mpo_requests_total", {"route": "/info", "status": "200"}) == 0


def test_an_app_counts_engine_steps_only_while_it_serves(make_client: ClientFactory) -> None:
    """Apps served one after another over one engine: each one's metrics watch its steps."""
    first = make_client()
    short = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "ignore_eos": True}}
    assert first.post("/generate", json=short).status_code == 200  # 2 steps
    metrics = first.app.state.metrics  # type: ignore[attr-defined]
    first.__exit__(None, None, None)  # its lifespan ends: it stops watching the engine
    second = make_client()
    long = {"inputs": "Hi", "parameters": {"max_new_tokens": 6, "ignore_eos": True}}
    assert second.post("/generate", json=long).status_code == 200  # 6 steps
    # A step reports after pushing its tokens, so a reply may arrive before its last step
    # is counted; every earlier step is. Read the first app once the second's steps ran.
    first_steps = metric_value(metrics.render()[0].decode(), "mpo_batch_size_count")
    second_steps = metric_value(second.get("/metrics").text, "mpo_batch_size_count")
    assert 1 <= first_steps <= 2  # its own request only, none of the second's
    assert second_steps >= 5


def test_body_too_large(make_client: ClientFactory) -> None:
    client = make_client(max_body_bytes=2048)
    big = {"inputs": "x" * 5000}
    error = assert_error(client.post("/generate", json=big), 413, text="2048")
    assert error["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit applies to the bytes actually sent
        yield b'{"inputs": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    streamed = client.post(
        "/generate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(streamed, 413)
    text = client.get("/metrics").text
    assert metric_value(text, "mpo_requests_total", {"route": "unmatched", "status": "413"}) >= 1


def test_bad_json_and_content_type(client: TestClient) -> None:
    json_headers = {"content-type": "application/json"}
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        error = assert_error(client.post(path, content=b"{nope", headers=json_headers), 400)
        assert error["code"] == "json_invalid"
        assert_error(client.post(path, content=b"[1, 2]", headers=json_headers), 400)
        assert_error(client.post(path, content=b"", headers=json_headers), 400)
        text = client.post(path, content=b'{"inputs": "x"}', headers={"content-type": "text/plain"})
        assert_error(text, 400, text="Content-Type must be application/json")
        assert_error(client.post(path, content=b"null", headers=json_headers), 400)


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/nowhere"), 404, text="/nowhere")
    assert_error(client.get("/generate"), 405)


def test_overload_gives_429_at_once(make_client: ClientFactory, policy_set: PolicySet) -> None:
    """429 while the queue cannot move: the engine is held between two steps meanwhile."""
    from mpo_core.decoding.sampling import SamplingParams
    from mpo_core.engine.core import GenerationRequest

    class HoldAfterFirstStep:
        def __init__(self) -> None:
            self.reached, self.release = threading.Event(), threading.Event()

        def on_step(self, batch_size: int, forward_seconds: dict[str, float]) -> None:
            self.reached.set()
            self.release.wait(timeout=60)

    gate = HoldAfterFirstStep()
    own = Engine(policy_set, EngineLimits(max_running=1, max_queued=1), observer=gate).start()
    client = make_client(engine_override=own)
    long = SamplingParams(max_new_tokens=200, ignore_eos=True, temperature=0)
    streams = [own.submit(GenerationRequest([5, 6, 7], long))]
    try:
        assert gate.reached.wait(timeout=60)  # the first request holds the only slot
        streams.append(own.submit(GenerationRequest([5, 6, 7], long)))  # waits: queue full
        response = client.post("/generate", json=GEN)  # waiting for room would block 60 s, then 200
        error = assert_error(response, 429)
        assert error["type"] == "rate_limit_error"
        assert int(response.headers["retry-after"]) >= 1
        chat = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "n": 2},
        )
        assert_error(chat, 429)
        assert own.stats().running == 1 and own.stats().waiting == 1  # nothing moved
    finally:
        for stream in streams:
            stream.cancel()
        gate.release.set()
        own.stop(timeout=2)


def test_concurrent_requests_admit_exactly_max_running_plus_max_queued(
    make_client: ClientFactory, policy_set: PolicySet
) -> None:
    """The issue's reproducer: max_running 2, max_queued 4 and 32 concurrent /generate.
    The engine is held inside the prefill of what it admitted (the window where the race
    freed their slots twice), so no request can finish and free a slot meanwhile."""
    own = Engine(policy_set, EngineLimits(max_running=2, max_queued=4))
    entered, release = threading.Event(), threading.Event()
    step = own.runner.verify  # the engine's one step call

    def held(running: Any, drafts: Any, newcomers: Any) -> Any:
        entered.set()
        assert release.wait(timeout=60)
        return step(running, drafts, newcomers)

    own.runner.verify = held  # type: ignore[method-assign]
    statuses: list[int] = []
    answered = threading.Condition()  # notified by every answer and every submission
    submit = own.submit

    def submit_and_tell(request: Any) -> Any:
        try:
            return submit(request)
        finally:
            with answered:
                answered.notify_all()

    own.submit = submit_and_tell  # type: ignore[method-assign]
    client = make_client(engine_override=own.start())

    def call() -> None:
        status = client.post("/generate", json=GEN).status_code
        with answered:
            statuses.append(status)
            answered.notify_all()

    threads = [threading.Thread(target=call) for _ in range(32)]
    try:
        for thread in threads:
            thread.start()
        assert entered.wait(timeout=60)

        def settled() -> bool:  # every request is refused or held by the engine
            held_now = own.stats().running + own.stats().waiting
            return statuses.count(429) + held_now == 32

        with answered:
            assert answered.wait_for(settled, timeout=60), statuses
        assert statuses.count(429) == 26 and own.stats().running + own.stats().waiting == 6
    finally:
        release.set()
        for thread in threads:
            thread.join(timeout=60)
        own.stop(timeout=5)
    assert sorted(statuses) == [200] * 6 + [429] * 26


# What breaks servers: missing values, negatives, overflowing ints, huge floats, wrong types.
ODD_VALUES: list[object] = [None, -1, 2**70, 1e308, "x", [1e308, 1e308, 1e308]]


def test_no_500_for_bad_input(admin_client: TestClient) -> None:
    """Every field of every route, set to odd values: only 2xx or 4xx come back."""
    from server_helpers import ADMIN

    bodies: dict[str, tuple[dict[str, Any], str | None]] = {
        "/generate": ({"inputs": "Hi", "parameters": {"max_new_tokens": 1}}, "parameters"),
        "/v1/completions": ({"prompt": "Hi", "max_tokens": 1}, None),
        "/v1/chat/completions": (
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}, None
        ),
        "/admin/profiles/p": ({"weights": [1, 1, 1]}, None),
    }  # fmt: skip
    fields = {
        "/generate": ["inputs", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                      "weights", "strength", "top_n_tokens", "truncate", "repetition_penalty"],
        "/v1/completions": ["prompt", "max_tokens", "n", "logprobs", "stop"],
        "/v1/chat/completions": ["messages", "max_completion_tokens", "top_logprobs", "model"],
        "/admin/profiles/p": ["weights", "strength", "version"],
    }  # fmt: skip
    statuses = set()
    for path, (base, nested) in bodies.items():
        method = admin_client.put if path.startswith("/admin") else admin_client.post
        for field in fields[path]:
            for value in ODD_VALUES:
                if nested and field != "inputs":
                    body = {**base, nested: {**base[nested], field: value}}
                else:
                    body = {**base, field: value}
                response = method(path, json=body, headers=ADMIN)
                assert response.status_code < 500, (path, field, value, response.text)
                statuses.add(response.status_code)
    assert {200, 400} <= statuses

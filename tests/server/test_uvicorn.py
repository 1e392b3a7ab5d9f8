"""The real thing: ``python -m server serve`` (the ``mpo`` CLI) under uvicorn on loopback.

One server process serves the module (starting one costs seconds: torch and transformers
imports); the last test stops it with SIGTERM in the middle of a stream.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pydantic
import pytest
from server_helpers import ADMIN_TOKEN, metric_value

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-loopback"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: the server is killed when the test process dies, so a run that is killed
    (a CI timeout) leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class ServerProcess:
    def __init__(self, config: Path, home: Path, **env_overrides: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "MPO_HOME": str(home),
            "MPO_API_KEY": API_KEY,
            "MPO_ADMIN_TOKEN": ADMIN_TOKEN,
            "MPO_DRAIN_TIMEOUT_S": "60",  # the last test's stream finishes well within it
            "OMP_NUM_THREADS": "1",
            **env_overrides,
        }
        self.log = (home / f"server-{self.port}.log").open("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--config", str(config),
             "--port", str(self.port), "--log-level", "info"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server did not become healthy:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mpo-home")


@pytest.fixture(scope="module")
def server(tiny_yaml: Path, home: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_yaml, home)
    yield proc
    if proc.proc.poll() is None:
        proc.proc.kill()
        proc.proc.wait()


def test_openai_client(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny", "helpful", "harmless", "concise", "base"]  # family, then each alone
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"weights": {"helpful": 1, "harmless": 1, "concise": 2}, "ignore_eos": True},
    )  # fmt: skip
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens == 4
    assert chat.choices[0].logprobs is not None
    assert len(chat.choices[0].logprobs.content or []) == chat.usage.completion_tokens
    assert chat.model_extra is not None
    assert chat.model_extra["mixing"]["weights"]["concise"] == 0.5

    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"weights": {"helpful": 1, "harmless": 1, "concise": 2}, "ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4

    completion = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, n=2, seed=1)
    assert [c.index for c in completion.choices] == [0, 1]

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=-1)
    assert "temperature" in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong").models.list()


class Forecast(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    rain: bool
    days: list[Literal["mon", "tue", "sun"]] = pydantic.Field(max_length=3)


def test_openai_client_structured_output_and_echo(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    messages: Any = [{"role": "user", "content": "Forecast"}]
    parsed = client.chat.completions.parse(
        model="tiny", messages=messages, response_format=Forecast, max_tokens=120,
        temperature=1.0, seed=4, n=2,
    )  # fmt: skip
    assert len(parsed.choices) == 2
    for choice in parsed.choices:  # the SDK sends a strict json_schema and validates it
        assert isinstance(choice.message.parsed, Forecast)
    plain = client.chat.completions.create(
        model="tiny", messages=messages, response_format={"type": "json_object"},
        max_tokens=120, temperature=1.0, seed=2,
    )  # fmt: skip
    assert isinstance(json.loads(plain.choices[0].message.content or ""), dict)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=4,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        )  # fmt: skip
    assert info.value.param == "response_format"
    echoed = client.completions.create(
        model="tiny", prompt="Hello there", max_tokens=2, echo=True, logprobs=1
    )
    logprobs = echoed.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert logprobs.token_logprobs[0] is None and logprobs.token_logprobs[1] is not None
    assert echoed.choices[0].text.startswith("Hello there")


def test_tgi_stream_and_disconnect(server: ServerProcess) -> None:
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as http:
        with http.stream("POST", "/generate_stream", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first[5:])["index"] == 0
        # the connection is closed mid-stream: the engine must drop the sequence
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            metrics = http.get("/metrics").text
            if metric_value(metrics, "mpo_num_requests_running") == 0:
                break
            time.sleep(0.05)
        assert metric_value(metrics, "mpo_num_requests_running") == 0
        assert metric_value(metrics, "mpo_generation_tokens_total") < 150


class StreamReader(threading.Thread):
    """Reads one ``/generate_stream`` to its end: its events, and the error if it was cut."""

    def __init__(self, url: str, max_new_tokens: int) -> None:
        super().__init__()
        self.url = url
        self.body = {"inputs": "Hi", "parameters": {"max_new_tokens": max_new_tokens,
                                                    "ignore_eos": True}}  # fmt: skip
        self.events: list[dict] = []
        self.first = threading.Event()
        self.failure: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/generate_stream", json=self.body,
                              headers=AUTH, timeout=60) as response:  # fmt: skip
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        self.events.append(json.loads(line[5:]))
                        self.first.set()
        except BaseException as exc:  # a cut stream: httpx.RemoteProtocolError
            self.failure = exc
        finally:
            self.first.set()


def wait_for_metric(url: str, name: str, value: float, timeout: float = 60) -> None:
    """Until the server's /metrics shows ``name`` at ``value`` (each look is its answer)."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = metric_value(httpx.get(f"{url}/metrics", timeout=10).text, name)
        if seen == value:
            return
    raise AssertionError(f"{name} stayed at {seen}, never {value}")


def test_sigterm_past_the_drain_timeout_ends_every_stream_with_a_final_event(
    tiny_yaml: Path, tmp_path: Path
) -> None:
    """The issue's reproducer: 4 long streams and a SIGTERM. With no drain time left the
    engine cancels them, and each stream's last event says so (no bare close)."""
    server = ServerProcess(tiny_yaml, tmp_path, MPO_DRAIN_TIMEOUT_S="0")
    try:
        readers = [StreamReader(server.url, max_new_tokens=250) for _ in range(4)]
        for reader in readers:
            assert reader.first.wait(timeout=60)
        wait_for_metric(server.url, "mpo_num_requests_running", 4)
        assert server.terminate() == 0, server.output()
        for reader in readers:
            reader.join(timeout=30)
    finally:
        server.proc.kill()
    log = server.output()
    for reader in readers:
        assert reader.failure is None, f"{reader.failure!r}\n{log}"
        *tokens, last = reader.events
        assert 1 <= len(tokens) < 250 and all("token" in e for e in tokens)
        assert "shutting down" in last["error"]["message"], last  # the final event
    assert "drain timeout" in log and "Application shutdown complete" in log
    assert "Traceback" not in log


def _slow_body_request(port: int, body: bytes) -> socket.socket:
    """A POST whose body is announced in full but sent only in part (it stays in flight)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:5])
    return sock


def test_sigterm_refuses_new_requests_and_lets_running_ones_finish(
    server: ServerProcess,
) -> None:
    """The module's server, last: a SIGTERM while a stream runs, a request is held in flight
    by its own unsent body and a fit job samples. New requests get 503, the stream and the
    held request finish, the fit is cancelled, then the server exits 0."""
    fit = httpx.post(f"{server.url}/admin/fit", headers=ADMIN, timeout=30, json={
        "prompts": ["Hi"] * 200, "samples_per_prompt": 8, "max_new_tokens": 8,
    }).json()  # fmt: skip
    body = json.dumps({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).encode()
    slow = _slow_body_request(server.port, body)  # the drain cannot end before it is sent
    wait_for_metric(server.url, "mpo_http_requests_in_flight", 2)  # itself and /metrics
    reader = StreamReader(server.url, max_new_tokens=60)
    assert reader.first.wait(timeout=60)
    server.proc.send_signal(signal.SIGTERM)

    while (health := httpx.get(f"{server.url}/health", timeout=10)).status_code == 200:
        pass  # every answer is the server's: 200 until the drain starts
    assert health.status_code == 503
    assert health.json()["error"]["code"] == "shutting_down"
    assert health.headers["retry-after"] == "1" and health.headers["connection"] == "close"
    refused = httpx.post(f"{server.url}/generate", json={"inputs": "Hi"}, headers=AUTH)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"

    reader.join(timeout=60)
    assert reader.failure is None and len(reader.events) == 60  # finished, not cut
    assert reader.events[-1]["generated_text"] is not None
    slow.sendall(body[5:])  # the held request ends, and with it the drain
    answer = slow.recv(65536).decode()
    slow.close()
    assert answer.startswith("HTTP/1.1 200"), answer
    assert server.proc.wait(timeout=60) == 0, server.output()
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(f"{server.url}/health", timeout=1)
    log = server.output()
    assert "drained: every request finished" in log
    assert f"fit job {fit['id']} cancelled" in log
    assert "Application shutdown complete" in log and "Traceback" not in log
    assert API_KEY not in log and ADMIN_TOKEN not in log

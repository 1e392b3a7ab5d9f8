"""Through a real uvicorn server in this process: what needs real connections.

Stock TGI clients on ``POST /``, the connection after an unexpected 500, SSE keep-alive
comments, and (``MPO_TEST_SCHEMATHESIS`` aside) a bounded schema fuzz run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.models.policies import PolicySet
from server.app import create_app
from server.settings import Settings

pytestmark = pytest.mark.slow
TGI_PYTHON = os.environ.get("MPO_TGI_PYTHON")  # a python with TGI's `text-generation` client
LORAX_PYTHON = os.environ.get("MPO_LORAX_PYTHON")  # a python with `lorax-client`


class _Server(uvicorn.Server):
    """uvicorn that says when it listens (an event, not a poll)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = threading.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.listening.set()


class LiveServer:
    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = _Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        assert self.server.listening.wait(timeout=60), "uvicorn did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def live(
    engine: Engine, make_settings: Callable[..., Settings]
) -> Iterator[Callable[..., LiveServer]]:
    servers: list[LiveServer] = []

    def start(
        engine_override: Engine | None = None, extra: Callable[[FastAPI], None] | None = None,
        **settings: Any,
    ) -> LiveServer:  # fmt: skip
        app = create_app(make_settings(**settings), engine=engine_override or engine)
        if extra is not None:
            extra(app)
        servers.append(LiveServer(app))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_kept_alive_connection_survives_an_unexpected_500(live: Callable[..., LiveServer]) -> None:
    def routes(app: FastAPI) -> None:
        @app.get("/test/port")
        def port(request: Request) -> dict[str, int]:
            assert request.client is not None
            return {"port": request.client.port}

        @app.get("/test/boom")
        def boom() -> None:
            raise RuntimeError("a bug")

    server = live(extra=routes)
    with httpx.Client(base_url=server.url, timeout=10) as http:  # one pooled connection
        before = http.get("/test/port").json()["port"]
        failed = http.get("/test/boom")
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "internal_error"  # a complete JSON body
        assert failed.headers.get("connection") != "close"
        assert http.get("/test/port").json()["port"] == before  # the same connection
        assert http.get("/health").status_code == 200


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_body_that_does_not_arrive_gets_408_and_a_closed_connection(
    live: Callable[..., LiveServer],
) -> None:
    """A slowloris: 16 sockets announce 1,000 bytes and send 5. Each gets its 408 (the test
    waits for the server's answer) and the server closes it; the server still serves."""
    server = live(body_timeout_s=0.2)
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    sockets = [socket.create_connection((host, int(port)), timeout=30) for _ in range(16)]
    try:
        for sock in sockets:
            sock.sendall(head.encode() + b'{"inp')
        for sock in sockets:
            answer = _read_until_closed(sock)  # returns only once the server closes
            status, _, rest = answer.partition(b"\r\n")
            assert status == b"HTTP/1.1 408 Request Timeout", answer
            assert b"connection: close" in rest.lower()
            body = json.loads(rest.partition(b"\r\n\r\n")[2])
            assert body["error"]["code"] == "request_timeout"
    finally:
        for sock in sockets:
            sock.close()
    ok = httpx.post(
        f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}}
    )
    assert ok.status_code == 200


class _Gate:
    """An engine observer that holds the decoding thread after each step until released."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def on_step(self, batch_size: int, forward_seconds: dict[str, float]) -> None:
        self.released.wait(timeout=60)  # the bound only guards a broken test


def test_idle_stream_gets_keepalive_comments(
    live: Callable[..., LiveServer], policy_set: PolicySet
) -> None:
    gate = _Gate()
    held = Engine(policy_set, EngineLimits(max_running=2, max_queued=2), observer=gate)
    server = live(engine_override=held, sse_keepalive_s=0.05)
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 3, "ignore_eos": True}}
    events, comments = [], 0
    try:
        with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                elif line == ": keep-alive":
                    comments += 1
                    gate.released.set()  # the engine held after token 1: let it go on
    finally:
        gate.released.set()
        held.stop(timeout=5)
    assert comments >= 1
    assert [e["index"] for e in events] == [0, 1, 2]
    assert events[-1]["generated_text"] is not None


def test_huggingface_hub_text_generation(
    live: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import InferenceClient, constants

    # HF_HUB_OFFLINE=1 (how an offline deployment runs) makes huggingface_hub refuse every
    # URL, this loopback server's too; the module read it once, at import.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    server = live(api_key="sk-hub")
    client = InferenceClient(base_url=server.url, api_key="sk-hub")
    expected = httpx.post(
        f"{server.url}/generate",
        json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}},
        headers={"Authorization": "Bearer sk-hub"},
    ).json()["generated_text"]
    assert client.text_generation("Hello", max_new_tokens=4) == expected
    detailed = client.text_generation("Hello", max_new_tokens=4, details=True)
    assert detailed.generated_text == expected
    assert detailed.details is not None and detailed.details.generated_tokens >= 1
    # Token texts of a byte-level vocabulary may be partial characters: compare the whole.
    streamed = list(client.text_generation("Hello", max_new_tokens=4, stream=True, details=True))
    assert streamed[-1].generated_text == expected
    assert len(streamed) == detailed.details.generated_tokens
    scored = client.text_generation(
        "Hello there", max_new_tokens=3, details=True, decoder_input_details=True,
        top_n_tokens=2, adapter_id="concise",
    )  # fmt: skip
    assert scored.details is not None and scored.details.prefill[0].logprob is None
    assert all(t.logprob is not None for t in scored.details.prefill[1:])
    assert scored.details.top_tokens is not None
    assert [len(step) for step in scored.details.top_tokens] == [2] * len(scored.details.tokens)
    alone = httpx.post(
        f"{server.url}/generate",
        json={"inputs": "Hello there", "parameters": {"max_new_tokens": 3,
                                                      "weights": {"concise": 1}}},
        headers={"Authorization": "Bearer sk-hub"},
    ).json()["generated_text"]  # fmt: skip
    assert scored.generated_text == alone
    shaped = client.text_generation(
        "Answer:", max_new_tokens=20, seed=3, do_sample=True,
        grammar={"type": "regex", "value": "(yes|no)-[0-9]{2}"},
    )  # fmt: skip
    assert re.fullmatch("(yes|no)-[0-9]{2}", shaped), shaped


@pytest.mark.skipif(not TGI_PYTHON, reason="set MPO_TGI_PYTHON to a python with text-generation")
def test_tgi_text_generation_client(live: Callable[..., LiveServer], engine: Engine) -> None:
    script = """
import json, sys
from text_generation import Client
client = Client(sys.argv[1], headers={"Authorization": "Bearer sk-tgi"}, timeout=60)
from text_generation.types import Grammar, GrammarType
whole = client.generate("Hello", max_new_tokens=4)
events = list(client.generate_stream("Hello", max_new_tokens=4))
scored = client.generate("Hello there", max_new_tokens=3, decoder_input_details=True,
                         top_n_tokens=2)
pattern = Grammar(type=GrammarType.Regex, value="(yes|no), [a-z]{2,6}")
regex = client.generate("Answer:", max_new_tokens=20, do_sample=True, seed=1, grammar=pattern)
schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}},
          "required": ["n"], "additionalProperties": False}
shaped = client.generate("JSON:", max_new_tokens=20, grammar=Grammar(type=GrammarType.Json,
                         value=schema))
print(json.dumps({"text": whole.generated_text, "n": whole.details.generated_tokens,
                  "events": len(events), "stream": events[-1].generated_text,
                  "prefill": [[t.id, t.logprob] for t in scored.details.prefill],
                  "top": [len(step) for step in scored.details.top_tokens],
                  "regex": regex.generated_text, "json": shaped.generated_text}))
"""
    server = live(api_key="sk-tgi")
    assert TGI_PYTHON is not None
    run = subprocess.run(
        [TGI_PYTHON, "-c", script, server.url], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    expected = httpx.post(
        f"{server.url}/generate",
        json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}},
        headers={"Authorization": "Bearer sk-tgi"},
    ).json()["generated_text"]
    assert result["text"] == expected == result["stream"]
    assert 1 <= result["n"] == result["events"] <= 4
    prefill = result["prefill"]
    assert [t for t, _ in prefill] == engine.tokenizer.encode("Hello there")
    assert prefill[0][1] is None and all(lp is not None and lp <= 0 for _, lp in prefill[1:])
    assert result["top"] == [2] * len(result["top"]) and result["top"]
    assert re.fullmatch("(yes|no), [a-z]{2,6}", result["regex"]), result["regex"]
    assert set(json.loads(result["json"])) == {"n"}


@pytest.mark.skipif(not LORAX_PYTHON, reason="set MPO_LORAX_PYTHON to a python with lorax-client")
def test_lorax_client_selects_one_adapter(live: Callable[..., LiveServer]) -> None:
    script = """
import json, sys
from lorax import Client
client = Client(sys.argv[1], headers={"Authorization": "Bearer sk-lorax"}, timeout=60)
one = client.generate("Hello", adapter_id="harmless", max_new_tokens=5, ignore_eos_token=True)
events = list(client.generate_stream("Hello", adapter_id="harmless", max_new_tokens=5,
                                     ignore_eos_token=True))
schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
shaped = client.generate("JSON:", max_new_tokens=20,
                         response_format={"type": "json_object", "schema": schema})
try:
    client.generate("Hello", adapter_id="nope", max_new_tokens=2)
    missing = None
except Exception as exc:
    missing = type(exc).__name__ + ": " + str(exc)
print(json.dumps({"text": one.generated_text, "prompt_tokens": one.details.prompt_tokens,
                  "stream": events[-1].generated_text, "json": shaped.generated_text,
                  "missing": missing}))
"""
    server = live(api_key="sk-lorax")
    assert LORAX_PYTHON is not None
    run = subprocess.run(
        [LORAX_PYTHON, "-c", script, server.url], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    expected = httpx.post(
        f"{server.url}/generate",
        json={"inputs": "Hello", "parameters": {"max_new_tokens": 5, "ignore_eos": True,
                                                "weights": {"harmless": 1}}},
        headers={"Authorization": "Bearer sk-lorax"},
    ).json()["generated_text"]  # fmt: skip
    assert result["text"] == expected == result["stream"]
    assert result["prompt_tokens"] >= 1
    assert json.loads(result["json"]) in ({"ok": True}, {"ok": False})
    assert result["missing"] is not None and "nope" in result["missing"]


def _schemathesis() -> list[str] | None:
    if shutil.which("schemathesis") or Path(sys.executable).with_name("schemathesis").exists():
        return [sys.executable, "-m", "schemathesis.cli"]
    return None


# Every check that says the document is true: no 500, documented statuses and bodies,
# schema-invalid bodies refused (negative mode), schema-valid ones accepted (positive
# mode) except the documented rules JSON Schema cannot state (schemathesis_hooks.py).
CHECKS = (
    "not_a_server_error,status_code_conformance,response_schema_conformance,"
    "negative_data_rejection,documented_positive_acceptance"
)
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")


def _fuzz(url: str, token: str, checks: str, *selection: str, folder: Path) -> None:
    """Positive and negative cases of each selected operation, bounded: a few examples
    an operation (MPO_FUZZ_EXAMPLES), deterministic generation, one worker."""
    command = [
        *(_schemathesis() or []), "run", f"{url}/openapi.json",
        "--checks", checks,
        "--mode", "all",
        "--header", f"Authorization: Bearer {token}",
        "--max-examples", os.environ.get("MPO_FUZZ_EXAMPLES", "25"),
        *selection,
        "--phases", "examples,coverage,fuzzing",
        "--generation-deterministic",
        "--request-timeout", "60",
        "--workers", "1",
        "--report", "junit", "--report-dir", str(folder),
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS.stem, "PYTHONPATH": str(HOOKS.parent)}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=folder, env=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]


@pytest.mark.skipif(_schemathesis() is None, reason="schemathesis is not installed (dev extra)")
def test_schema_fuzz_run_finds_no_failures(live: Callable[..., LiveServer], tmp_path: Path) -> None:
    """A bounded schemathesis run over every operation but the fit routes (below), in
    positive and negative modes: no 500, only documented statuses and bodies, every body
    the schema refuses refused, every body it allows accepted but for the documented rules
    (prompt + new tokens within the context, files and reward sets the server must have,
    schemas the grammar library must compile).

    One token serves as API key and admin token, so every operation can be reached.
    """
    token = "fuzz-token"
    server = live(api_key=token, admin_token=token, max_n=4, default_max_tokens=8)
    _fuzz(server.url, token, CHECKS, "--exclude-path-regex", "^/admin/fit", folder=tmp_path)


@pytest.mark.skipif(_schemathesis() is None, reason="schemathesis is not installed (dev extra)")
def test_schema_fuzz_of_the_fit_routes_with_a_stubbed_driver(
    live: Callable[..., LiveServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fit routes under the same checks; the driver is a stub that validates its options
    and reports uniform weights at once (a real fuzzed fit is minutes of CPU)."""
    from mpo_core.fitting import driver as fit_driver

    def stub(engine: Any, prompts: list[str], options: Any, *_: Any, **__: Any) -> Any:
        options.validate()
        names = list(engine.policy_names)
        return fit_driver.FitReport(
            weights={n: 1 / len(names) for n in names}, objective=0.0, policy_names=names,
            rows={}, num_prompts=len(prompts), samples_per_prompt=options.samples_per_prompt,
            iterations=options.iterations, step_size=options.step_size or 1.0,
            batch_size=options.batch_size, seed=options.seed, mean_reply_tokens=0.0,
            objective_trace=[], seconds={},
        )  # fmt: skip

    monkeypatch.setattr(fit_driver, "run_fit", stub)
    token = "fuzz-token"
    server = live(api_key=token, admin_token=token)
    _fuzz(server.url, token, CHECKS, "--include-path-regex", "^/admin/fit", folder=tmp_path)
    jobs = httpx.get(f"{server.url}/admin/fit", headers={"Authorization": f"Bearer {token}"})
    assert "done" in {job["state"] for job in jobs.json()["jobs"]}  # fits ran, through the stub

"""``mpo serve`` with a family over 3 ranks (it spawns ranks 1 and 2 itself), from outside:
the replies equal the one-process family's, a worker that dies or hangs ends the requests
in flight with an error and turns /health unhealthy, SIGTERM drains and stops the workers.

Waits are on the server's own answers (a response, the process's exit, /health's status)
with generous deadlines; nothing sleeps to let something happen.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mpo_core.config import load_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine import Engine, GenerationRequest
from mpo_core.runners import load_policy_set
from mpo_core.testing.families import make_tiny_family

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class Serve:
    """``python -m server serve --config <ranked family>`` on a free port."""

    def __init__(self, config: Path, home: Path, launcher: list[str] | None = None) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "MPO_HOME": str(home),
               "OMP_NUM_THREADS": "1", "MPO_DRAIN_TIMEOUT_S": "30"}  # fmt: skip
        for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MPO_API_KEY"):
            env.pop(key, None)
        self.log = (home / f"serve-{self.port}.log").open("w+")
        self.proc = subprocess.Popen(
            [*(launcher or [sys.executable]), "-m", "server", "serve", "--config", str(config),
             "--port", str(self.port), "--log-level", "info"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.until(lambda: self.health() == 200, "the server to answer /health", 240)
        self.workers = [r["pid"] for r in self.info()["distributed"]["ranks"] if r["rank"] > 0]

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def health(self) -> int | None:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code
        except httpx.TransportError:
            assert self.proc.poll() is None, self.output()
            return None

    def info(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/info", timeout=10).json())

    def until(self, done: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"waited {timeout} s for {what}\n{self.output()}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.workers:
            _kill(pid, signal.SIGKILL)
        self.log.close()


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" in status.read_text()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_family(tmp_path_factory.mktemp("dist-http") / "family")


def _ranked(family: Path, **distributed: Any) -> Path:
    data = yaml.safe_load(family.read_text())
    data["policies"] = [dict(p, rank=i) for i, p in enumerate(data["policies"])]
    data["distributed"] = distributed
    path = family.with_name(f"ranked-{len(distributed)}.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def server(family: Path, tmp_path: Path) -> Iterator[Serve]:
    serve = Serve(_ranked(family), tmp_path)
    yield serve
    serve.stop()


PROMPT = "hello there"
PARAMS: dict[str, Any] = {
    "max_new_tokens": 12,
    "details": True,
    "decoder_input_details": True,
    "weights": {"helpful": 0.5, "harmless": 0.3, "concise": 0.2},
    "strength": 0.7,
}


def test_replies_equal_the_one_process_family(family: Path, server: Serve) -> None:
    info = server.info()
    assert info["backend"] == "distributed"
    ranks = {r["rank"]: r for r in info["distributed"]["ranks"]}
    assert set(ranks[1]["members"]) == {"harmless"} and set(ranks[2]["members"]) == {"concise"}
    reply = httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": PARAMS},
                       timeout=60).json()  # fmt: skip
    alone = load_policy_set(load_config(family))
    with Engine(alone) as engine:
        prompt = alone.tokenizer.encode(PROMPT)
        mixture = engine.mixture(PARAMS["weights"], PARAMS["strength"])
        sampling = SamplingParams(max_new_tokens=12, temperature=0.0)
        want = engine.generate(GenerationRequest(prompt, sampling, mixture))
    tokens = reply["details"]["tokens"]
    assert [t["id"] for t in tokens] == want.token_ids
    for got, event in zip(tokens, want.events, strict=True):
        assert abs(got["logprob"] - event.logprob) < 1e-5
    prefill = reply["details"]["prefill"]
    assert [t["id"] for t in prefill] == prompt  # prompt log-probs came from every rank
    assert server.info()["distributed"]["traffic"]["steps"] > 0


def _stream(server: Serve, tokens: int) -> Iterator[dict[str, Any]]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": tokens, "ignore_eos": True}}
    with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line[5:])


def test_a_worker_killed_mid_stream(server: Serve) -> None:
    """kill -9 of rank 2 while a reply streams: the stream ends with an error event, the
    next request gets 503, /health turns unhealthy (an orchestrator restarts the group)."""
    events = _stream(server, 200)
    first = next(events)
    assert "token" in first
    _kill(server.workers[1], signal.SIGKILL)
    rest = list(events)
    assert rest and "error" in rest[-1], rest[-3:]
    server.until(lambda: server.health() == 503, "/health to turn unhealthy")
    health = httpx.get(f"{server.url}/health", timeout=5).json()
    assert "rank 2" in health["error"]["message"] or "worker" in health["error"]["message"]
    reply = httpx.post(f"{server.url}/generate", json={"inputs": PROMPT}, timeout=30)
    assert reply.status_code == 503
    server.until(lambda: _gone(server.workers[0]), "rank 1 to be stopped")


def test_a_hung_worker_fails_within_the_step_timeout(family: Path, tmp_path: Path) -> None:
    """SIGSTOP of rank 1: the request in flight fails once ``step_timeout_s`` passes."""
    serve = Serve(_ranked(family, step_timeout_s=4.0, heartbeat_s=1.0), tmp_path)
    try:
        _kill(serve.workers[0], signal.SIGSTOP)
        started = time.monotonic()
        reply = httpx.post(f"{serve.url}/generate", json={"inputs": PROMPT}, timeout=60)
        assert reply.status_code == 503, reply.text
        assert time.monotonic() - started < 45  # bounded: the timeout plus the step
        serve.until(lambda: serve.health() == 503, "/health to turn unhealthy")
    finally:
        _kill(serve.workers[0], signal.SIGCONT)
        serve.stop()


def test_sigterm_drains_and_stops_the_workers(server: Serve) -> None:
    events = _stream(server, 24)
    assert "token" in next(events)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(events)
    assert "error" not in rest[-1] and rest[-1].get("generated_text") is not None, rest[-1]
    assert 1 + len(rest) == 24  # the whole reply was drained
    assert server.proc.wait(timeout=120) == 0
    for pid in server.workers:
        server.until(functools.partial(_gone, pid), f"worker {pid} to exit")


def test_torchrun_launch_serves_and_drains(family: Path, tmp_path: Path) -> None:
    """The several-machines launch on one machine: torchrun starts 3 processes of the same
    ``mpo serve``; rank 0 serves, ranks 1 and 2 are workers. torchrun's SIGTERM reaches
    every rank at once: the workers keep serving until rank 0 has drained its stream."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc-per-node", "3", "--master-addr", "127.0.0.1",
                "--master-port", str(port)]  # fmt: skip
    serve = Serve(_ranked(family), tmp_path, launcher=torchrun)
    try:
        info = serve.info()
        assert [r["rank"] for r in info["distributed"]["ranks"]] == [0, 1, 2]
        assert set(info["distributed"]["ranks"][2]["members"]) == {"concise"}
        events = _stream(serve, 240)
        assert "token" in next(events)
        serve.proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
        rest = list(events)
        assert "error" not in rest[-1] and rest[-1].get("generated_text") is not None, rest[-1]
        assert 1 + len(rest) == 240
        serve.proc.wait(timeout=120)
        assert "rank 1: stop" in serve.output() or "rank 2: stop" in serve.output()
    finally:
        serve.stop()

"""The system under test: ``engine`` (mpo_core in-process) and ``http`` (the server).

In both, the ``c`` requests arrive together; each token's arrival time is taken where
a caller would see it: when its event reaches the asyncio loop (engine) or when its SSE
``data:`` line is read off the socket (http).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, GenerationRequest

from .common import PROMPT_TOKENS, REPO, RequestTimes, now


def greedy_params(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)


async def _consume(stream: Any, times: RequestTimes) -> None:
    async for event in stream:
        if event.token_id < 0:  # a bare finish event (cancelled), carries no token
            break
        times.token_times.append(now())
        times.token_ids.append(event.token_id)


async def _engine_async(
    engine: Engine, prompts: list[list[int]], new_tokens: int
) -> tuple[list[RequestTimes], float, float]:
    start = now()
    requests = [RequestTimes(arrival=start) for _ in prompts]
    streams = [
        engine.submit(GenerationRequest(prompt_ids=p, sampling=greedy_params(new_tokens)))
        for p in prompts
    ]
    await asyncio.gather(*(_consume(s, t) for s, t in zip(streams, requests)))
    return requests, start, now()


def run_engine(
    engine: Engine, prompts: list[list[int]], new_tokens: int
) -> tuple[list[RequestTimes], float, float]:
    """Submit every prompt at once (uniform weights, greedy) and wait for all of them."""
    return asyncio.run(_engine_async(engine, prompts, new_tokens))


# -- http ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``mpo serve`` in a subprocess on 127.0.0.1, stopped on exit."""

    def __init__(self, config: Path, home: Path, threads: int, max_running: int = 16) -> None:
        self.port = free_port()
        env = {**os.environ, "MPO_HOME": str(home), "PYTHONPATH": str(REPO)}
        if threads > 0:
            env["OMP_NUM_THREADS"] = str(threads)
        command = [sys.executable, "-m", "server", "serve", "--config", str(config)]
        command += ["--port", str(self.port), "--max-running", str(max_running)]
        command += ["--log-level", "warning"]
        self.process = subprocess.Popen(command, cwd=REPO, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the server at {self.url} was not healthy after {timeout} s")

    @property
    def pid(self) -> int:
        return self.process.pid

    def __enter__(self) -> ServerProcess:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def stream_body(text: str, new_tokens: int) -> dict[str, Any]:
    """TGI ``/generate_stream``: greedy, EOS ignored, the prompt cut to its last 32 tokens."""
    return {
        "inputs": text,
        "parameters": {
            "max_new_tokens": new_tokens,
            "do_sample": False,
            "ignore_eos": True,
            "truncate": PROMPT_TOKENS,
        },
    }


async def _one_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], times: RequestTimes
) -> None:
    async with client.stream("POST", f"{url}/generate_stream", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"/generate_stream answered {response.status_code}: {detail}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "token" not in event:
                raise RuntimeError(f"the stream failed: {event}")
            times.token_times.append(now())
            times.token_ids.append(int(event["token"]["id"]))


async def _http_async(
    url: str, texts: list[str], new_tokens: int
) -> tuple[list[RequestTimes], float, float]:
    limits = httpx.Limits(max_connections=len(texts), max_keepalive_connections=len(texts))
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        start = now()
        requests = [RequestTimes(arrival=start) for _ in texts]
        await asyncio.gather(
            *(
                _one_stream(client, url, stream_body(t, new_tokens), r)
                for t, r in zip(texts, requests)
            )
        )
    return requests, start, now()


def run_http(
    url: str, texts: list[str], new_tokens: int
) -> tuple[list[RequestTimes], float, float]:
    """``len(texts)`` concurrent streaming clients, one request each."""
    return asyncio.run(_http_async(url, texts, new_tokens))

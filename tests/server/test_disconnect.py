"""A client that leaves has its sequence cancelled in the engine, streaming or not.

The app is called as raw ASGI so the test controls exactly when ``http.disconnect``
arrives; the app's lifespan runs in the TestClient's portal.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from server_helpers import ClientFactory

from mpo_core.engine.core import Engine

MAX_NEW = 200


def scope_for(path: str) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234), "server": ("testserver", 80),
    }  # fmt: skip


async def leave_early(app: Any, engine: Engine, path: str, body: dict, after_body: bool) -> int:
    """Start a request, disconnect once it runs (or streams), return the tokens it cost."""
    gone = asyncio.Event()
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    before = engine.stats().generated_tokens
    task = asyncio.ensure_future(app(scope_for(path), receive, send))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        streaming = any(m.get("body") for m in sent if m["type"] == "http.response.body")
        if (streaming if after_body else engine.stats().running) or task.done():
            break
        await asyncio.sleep(0.002)
    assert not task.done(), sent  # still generating when the client leaves
    gone.set()
    await asyncio.wait_for(task, timeout=10)
    deadline = time.monotonic() + 5
    while engine.stats().running and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert engine.stats().running == 0
    return engine.stats().generated_tokens - before


TGI = {"inputs": "Hi", "parameters": {"max_new_tokens": MAX_NEW, "ignore_eos": True}}
COMPLETION = {"prompt": "Hi", "max_tokens": MAX_NEW, "ignore_eos": True, "n": 2}
CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": MAX_NEW, "n": 2,
        "ignore_eos": True, "stream": True}  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "after_body"),
    [
        ("/generate", TGI, False),
        ("/generate_stream", TGI, True),
        ("/v1/completions", COMPLETION, False),
        ("/v1/chat/completions", CHAT, True),
    ],
)
def test_disconnect_cancels(
    make_client: ClientFactory, engine: Engine, path: str, body: dict, after_body: bool
) -> None:
    app = make_client().app
    spent = asyncio.run(leave_early(app, engine, path, body, after_body))
    sequences = body.get("n", 1)
    assert spent < sequences * MAX_NEW / 2, f"{spent} tokens generated after the client left"

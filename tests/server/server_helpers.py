"""Small helpers shared by the server tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

ClientFactory = Callable[..., TestClient]
ADMIN_TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def sse_events(client: TestClient, path: str, body: dict[str, Any], **kw: Any) -> list[Any]:
    """POST and parse a server-sent-event stream: JSON payloads, "[DONE]" kept as a string."""
    events: list[Any] = []
    with client.stream("POST", path, json=body, **kw) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    want = "" if not labels else "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name + want:
            return float(value)
    return 0.0


def assert_error(response: Any, status: int, param: str | None = None, text: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    assert text.lower() in error["message"].lower(), error
    return error

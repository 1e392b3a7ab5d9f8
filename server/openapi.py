"""The OpenAPI document as the server behaves: its error statuses, body and media types.

Routes declare the statuses they can answer with ``error_responses(...)``; every error has
OpenAI's body (``ErrorResponse``). FastAPI's default 422 ``HTTPValidationError`` is dropped:
validation errors are answered 400 (``errors.validation_error_response``). Streaming
routes declare ``text/event-stream`` and ``/metrics`` ``text/plain`` where they are routed.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .protocol.errors import ErrorResponse

_DESCRIPTIONS = {
    400: "A bad parameter or body; `error.param` names the field",
    401: "Missing or wrong bearer token (the API key, or the admin token on /admin)",
    403: "Admin routes are disabled: the server has no admin token",
    404: "Unknown model, profile or fit job",
    409: "A fit job is already running",
    413: "The request body is larger than the server accepts",
    429: "Overloaded: retry after the Retry-After header's seconds",
    503: "The engine or the profile store is not ready; retry shortly",
}
# What every route that reads a JSON body can answer, besides its own statuses.
BODY_ERRORS = (400, 413)

ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}
# Before OpenAPI 3.2 the schema of text/event-stream describes one event.
EVENT_STREAM: dict[str, Any] = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "description": "One server-sent event: `data` is a JSON object (OpenAI streams end "
            "with `[DONE]`); idle streams get `: keep-alive` comments",
            "properties": {
                "data": {"type": "string"},
                "event": {"type": "string"},
                "id": {"type": "string"},
            },
        }
    }
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: each status with its meaning and OpenAI's error body."""
    return {
        status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        for status in sorted(set(statuses))
    }


def streaming_ok(description: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or server-sent events when the body asks to stream."""
    return {200: {"description": description, "content": EVENT_STREAM}}


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with a builder that drops FastAPI's unused 422."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    responses = operation.get("responses", {})
                    responses.pop("422", None)
                    for status, response in responses.items():
                        if status.startswith(("4", "5")):  # errors are JSON on every route
                            response["content"] = {"application/json": {"schema": ERROR_SCHEMA}}
            schemas = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            add_security(app, schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]


SECURITY_SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The API key (`--api-key` / `MPO_API_KEY`): the inference routes and "
        "/info, when the server has one",
    },
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The admin token (`--admin-token` / `MPO_ADMIN_TOKEN`): /admin/*",
    },
}


def add_security(app: FastAPI, schema: dict[str, Any]) -> None:
    """``securitySchemes`` and each operation's ``security``: /admin/* takes the admin
    token; every other operation that can answer 401 takes the API key, when the server
    has one. The rest (/health, /metrics, the documents) are open."""
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    api_key_set = app.state.settings.api_key is not None
    for path, path_item in schema.get("paths", {}).items():
        for operation in path_item.values():
            if path.startswith("/admin"):
                operation["security"] = [{"adminToken": []}]
            elif api_key_set and "401" in operation.get("responses", {}):
                operation["security"] = [{"apiKey": []}]


def _path_pattern(template: str) -> re.Pattern[str]:
    """``/admin/profiles/{name}`` -> a regex matching the paths it routes."""
    parts = re.split(r"(\{[^}/]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def operations_at(app: FastAPI, path: str) -> dict[str, dict[str, Any]]:
    """The document's operations for a request path, by upper-case method: what the 405's
    ``Allow`` lists and what the body limit checks tokens against."""
    table = getattr(app.state, "operation_table", None)
    if table is None:
        paths = app.openapi().get("paths", {})
        table = [(_path_pattern(t), item) for t, item in paths.items()]
        app.state.operation_table = table
    found: dict[str, dict[str, Any]] = {}
    for pattern, item in table:
        if pattern.fullmatch(path):
            found.update({method.upper(): op for method, op in item.items()})
    return found

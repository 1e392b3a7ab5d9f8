"""Map every failure to OpenAI's error body with the status docs/architecture.md
(Errors) gives it.

Engine errors (``mpo_core.errors``) and request validation errors get app-wide handlers,
so routes raise and never build error responses themselves. Bad input never becomes a 500;
anything unexpected is answered by ``middleware.UnexpectedErrorMiddleware``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mpo_core.errors import (
    EngineNotRunning,
    GenerationFailed,
    InvalidParameter,
    Overloaded,
    UnknownProfile,
)
from mpo_core.rules import unicode_problem

from .openapi import operations_at
from .protocol.errors import error_body
from .store.base import StoreUnavailable

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error raised by the server layer itself (auth, unknown model, limits)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status."""
    return _TYPE_BY_STATUS.get(status, "server_error")


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(message, error_type(status), param=param, code=code)
    return JSONResponse(body, status_code=status, headers=headers)


def retry_after_header(seconds: float) -> dict[str, str]:
    """Retry-After takes whole seconds; round up so a client never retries too early."""
    return {"Retry-After": str(max(1, int(-(-seconds // 1))))}


# Pydantic names the member of a union that failed ("str", "list[int]",
# "function-after[...]", a model such as a fan-out's "MixtureSpec"); those are not part
# of the field's name.
_UNION_MEMBERS = {
    "str", "int", "float", "bool", "dict", "list", "none", "tuple", "MixtureSpec",
    "PersonaPrompt",
}  # fmt: skip


def _loc_to_param(loc: Sequence[Any]) -> str:
    """("body", "parameters", "top_p") -> "parameters.top_p"; list indices kept: "stop.2"."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    while "[key]" in parts:  # a dict's key: the error is the dict field's, not the key's
        at = parts.index("[key]")
        parts = parts[: max(0, at - 1)] + parts[at + 1 :]
    parts = [p for p in parts if p not in _UNION_MEMBERS and "[" not in p and "(" not in p]
    return ".".join(parts)


def _is_json_request(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def validation_error_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    """One 400 naming the first offending field; the count of the others follows."""
    errors = list(exc.errors())
    if request.method in {"POST", "PUT", "PATCH"} and not _is_json_request(request):
        got = request.headers.get("content-type") or "none"
        message = f"Content-Type must be application/json (got {got})"
        return error_response(400, message, code="unsupported_content_type")
    if not errors:
        return error_response(400, "invalid request", code="invalid_request")
    first = _most_specific(errors)
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        pos = first["loc"][-1] if first.get("loc") else "?"
        return error_response(
            400, f"invalid JSON body: {reason} at position {pos}", code="json_invalid"
        )
    param = _loc_to_param(first.get("loc", ()))
    message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    cause = (first.get("ctx") or {}).get("error")
    if "input" in first and first.get("type") not in {"missing", "extra_forbidden"}:
        message += f" (got {_short_repr(first['input'])})"
    if first.get("type") == "extra_forbidden":
        message = f"{param}: unknown field"
    elif first.get("type") == "string_unicode":  # pydantic's own check of constrained strings
        text = first.get("input")
        problem = unicode_problem(text) if isinstance(text, str) else None
        message = f"{param or 'body'}: {problem or 'not valid Unicode (a lone surrogate)'}"
    elif not param and isinstance(cause, InvalidParameter):
        # A rule between fields (a model's validator): the rule names the field to fix.
        param, message = cause.param, f"{cause.param}: {cause.message}"
    more = len(errors) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return error_response(400, message, param=param or None, code=first.get("type"))


def _most_specific(errors: list[Any]) -> Any:
    """The first error, or a deeper one about the same field: of a union such as
    ``str | list[TextPart]``, the member that got furthest says what is wrong."""
    first = errors[0]
    param = _loc_to_param(first.get("loc", ()))
    same_field = [
        e for e in errors if (_loc_to_param(e.get("loc", ())) + ".").startswith(param + ".")
    ]
    return max(same_field, key=lambda e: len(_loc_to_param(e.get("loc", ()))))


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _on_invalid_parameter(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidParameter)
    return error_response(400, exc.message, param=exc.param, code="invalid_parameter")


async def _on_unknown_profile(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnknownProfile)
    return error_response(404, str(exc), param="profile", code="profile_not_found")


async def _on_overloaded(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Overloaded)
    headers = retry_after_header(exc.retry_after)
    return error_response(429, str(exc), code="overloaded", headers=headers)


async def _on_not_running(request: Request, exc: Exception) -> JSONResponse:
    message = str(exc) or "the engine is not running"
    return error_response(503, message, code="engine_not_running", headers={"Retry-After": "5"})


async def _on_store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    message = str(exc) or "the profile store is unavailable"
    return error_response(503, message, code="store_unavailable", headers={"Retry-After": "5"})


def _validation_handler(
    authorize: Callable[[Request], None],
) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """400 for a bad body or parameter, once ``authorize`` (the route's token checks) passed."""

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        try:
            authorize(request)
        except APIError as auth_error:
            return await _on_api_error(request, auth_error)
        return validation_error_response(request, exc)

    return on_validation


def _unparsable_body(exc: StarletteHTTPException) -> str | None:
    """Why FastAPI could not parse a JSON body, when ``json.loads`` failed outside its
    JSONDecodeError: bytes that are not UTF-8, nesting past the recursion limit, an integer
    past Python's digit limit. None for other HTTP errors."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 (byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the body is nested too deeply"
    if isinstance(cause, ValueError):
        return str(cause).split(";")[0][:200]  # e.g. an integer with too many digits
    return None


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    reason = _unparsable_body(exc)
    if reason is not None:
        return error_response(400, f"invalid JSON body: {reason}", code="json_invalid")
    status = exc.status_code
    if isinstance(exc.detail, str) and exc.detail:
        message = exc.detail
    else:
        message = HTTPStatus(status).phrase
    if status == 404:
        message = f"no route {request.method} {request.url.path}"
    headers = dict(exc.headers or {})
    if status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response(
        status, message, code=HTTPStatus(status).phrase.lower().replace(" ", "_"), headers=headers
    )


def _allowed_methods(request: Request) -> list[str]:
    """Every method the API serves on this path (Starlette names only the first route's,
    and each method of ``/admin/profiles/{name}`` is a route of its own)."""
    return sorted(operations_at(request.app, request.url.path))


async def _on_generation_failed(request: Request, exc: Exception) -> JSONResponse:
    logger.error("generation failed on %s %s: %s", request.method, request.url.path, exc)
    return error_response(500, str(exc), code="generation_failed")


def _http_handler(
    authorize: Callable[[Request], None],
) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """Starlette's HTTP errors; a body FastAPI could not parse (400) waits for the tokens."""

    async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:
            try:
                authorize(request)
            except APIError as auth_error:
                return await _on_api_error(request, auth_error)
        return await _on_http_exception(request, exc)

    return on_http_exception


def install_error_handlers(app: FastAPI, authorize: Callable[[Request], None]) -> None:
    """Register the handlers; most specific first does not matter (FastAPI walks the MRO)."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(InvalidParameter, _on_invalid_parameter)
    app.add_exception_handler(UnknownProfile, _on_unknown_profile)
    app.add_exception_handler(Overloaded, _on_overloaded)
    app.add_exception_handler(EngineNotRunning, _on_not_running)
    app.add_exception_handler(StoreUnavailable, _on_store_unavailable)
    app.add_exception_handler(GenerationFailed, _on_generation_failed)
    app.add_exception_handler(RequestValidationError, _validation_handler(authorize))
    app.add_exception_handler(StarletteHTTPException, _http_handler(authorize))

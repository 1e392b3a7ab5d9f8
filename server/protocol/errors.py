"""The one error shape every route answers with: OpenAI's ``{"error": {...}}``."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str  # says what is wrong and, for bad input, names the field and value
    type: str  # "invalid_request_error", "authentication_error", ...
    param: str | None = None  # dotted field name for a bad parameter
    code: str | None = None  # a stable machine-readable reason


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    """The JSON body of an error response. A lone surrogate a client sent, quoted in the
    message or the field's name, is escaped (``\\ud800``): a response body is UTF-8."""
    detail = ErrorDetail(
        message=_printable(message) or "", type=type_, param=_printable(param), code=code
    )
    return ErrorResponse(error=detail).model_dump()


def _printable(text: str | None) -> str | None:
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")

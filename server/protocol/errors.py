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
    """The JSON body of an error response."""
    detail = ErrorDetail(message=message, type=type_, param=param, code=code)
    return ErrorResponse(error=detail).model_dump()

"""Bearer-token checks: an optional API key for inference, a separate admin token.

Tokens are compared with ``hmac.compare_digest`` (constant time) and never logged.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from .errors import APIError

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(given: str | None, expected: SecretStr) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


def check_api_key(request: Request, api_key: SecretStr | None) -> None:
    """Inference routes: open when no key is configured, else the bearer must match."""
    if api_key is None:
        return
    token = bearer_token(request)
    if token is None:
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers=_CHALLENGE,
        )
    if not token_matches(token, api_key):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers=_CHALLENGE)


def check_admin_token(request: Request, admin_token: SecretStr | None) -> None:
    """Admin routes: disabled (403) without a configured token, else the bearer must match."""
    if admin_token is None:
        raise APIError(
            403,
            "admin routes are disabled: start the server with an admin token "
            "(MPO_ADMIN_TOKEN=<token> or `mpo serve --admin-token <token>`) to enable them",
            code="admin_disabled",
        )
    token = bearer_token(request)
    if token is None:
        raise APIError(
            401,
            "missing admin token: send 'Authorization: Bearer <admin token>'",
            code="missing_admin_token",
            headers=_CHALLENGE,
        )
    if not token_matches(token, admin_token):
        raise APIError(401, "invalid admin token", code="invalid_admin_token", headers=_CHALLENGE)

"""The browser pages: ``GET /`` (links) and ``GET /playground`` (docs/playground.md).

Static HTML, CSS and JavaScript from ``server/static``, written for this project and
served as they are (no build step, nothing fetched from elsewhere). The playground calls
the public API from the browser with the key the user types, so these routes take none
and stay out of the OpenAPI document. Its Content-Security-Policy lets the page load and
connect to this origin only, so a key typed into it cannot be sent anywhere else.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, Response

from ..deps import SettingsDep
from ..errors import error_response

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "tokens.js": "text/javascript; charset=utf-8",
}
PAGE_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",  # data: for the empty favicon
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'self'",
    ]
)
# Each deploy serves one version of these files; a browser asks again after a minute.
HEADERS = {"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "max-age=60"}

router = APIRouter(include_in_schema=False)


@cache
def read(relative: str) -> str:
    return (STATIC / relative).read_text(encoding="utf-8")


@router.get("/")
def index() -> Response:
    return Response(read("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground")
def playground(settings: SettingsDep) -> Response:
    """The page; it learns whether to ask for an API key before its first request (a
    request refused with 401 would log an error in the browser's console)."""
    required = "false" if settings.api_key is None else "true"
    page = read("playground/index.html").replace("{{API_KEY_REQUIRED}}", required)
    return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/{asset}")
def playground_asset(asset: str) -> Response:
    media_type = ASSETS.get(asset)
    if media_type is None:  # only the listed files: no path reaches the rest of the disk
        return error_response(404, f"no playground file {asset!r}", code="not_found")
    return Response(read(f"playground/{asset}"), media_type=media_type, headers=HEADERS)

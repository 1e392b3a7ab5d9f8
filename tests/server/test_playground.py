"""The playground's routes and headers over HTTP (the page itself: test_playground_browser)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from fastapi.testclient import TestClient
from server_helpers import ClientFactory, assert_error

STATIC = Path(__file__).resolve().parents[2] / "server" / "static"


class Links(HTMLParser):
    """The ``src`` and ``href`` values of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]


def links(html: str) -> list[str]:
    parser = Links()
    parser.feed(html)
    return parser.urls


def test_page_loads_its_own_files_only(client: TestClient) -> None:
    page = client.get("/playground")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for directive in ("connect-src 'self'", "script-src 'self'", "frame-ancestors 'self'"):
        assert directive in policy
    assert page.headers["x-frame-options"] == "SAMEORIGIN"
    assets = [u for u in links(page.text) if u.startswith("/playground/")]
    assert {"/playground/playground.js", "/playground/playground.css"} <= set(assets)
    for url in links(page.text):  # nothing from another origin
        assert url.startswith(("/", "#", "data:")), url
    for asset in assets:
        answer = client.get(asset)
        assert answer.status_code == 200, asset
        kind = "text/css" if asset.endswith(".css") else "text/javascript"
        assert answer.headers["content-type"].startswith(kind)
    imports = re.findall(r'from "(\./[\w.]+)"', client.get("/playground/playground.js").text)
    assert imports  # the modules it imports are served too
    for module in imports:
        assert client.get(f"/playground/{module[2:]}").status_code == 200


def test_static_files_reach_no_other_origin_and_write_no_markup() -> None:
    for path in STATIC.rglob("*"):
        if path.suffix not in (".html", ".js", ".css"):
            continue
        text = path.read_text()
        assert not re.search(r"https?://", text), path  # no CDN, no font service
        if path.suffix == ".js":  # model text goes through textContent only
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
                assert sink not in text, (path, sink)


def test_page_says_whether_a_key_is_needed(make_client: ClientFactory) -> None:
    open_page = make_client().get("/playground").text
    assert 'data-api-key-required="false"' in open_page
    keyed = make_client(api_key="sk-page")
    page = keyed.get("/playground")  # the page itself takes no key: it asks for one
    assert page.status_code == 200
    assert 'data-api-key-required="true"' in page.text
    assert "sk-page" not in page.text
    assert_error(keyed.get("/v1/models"), 401)


def test_unknown_files_are_404(client: TestClient) -> None:
    for path in ("/playground/app.py", "/playground/..%2F..%2Fapp.py", "/playground/index.html"):
        assert_error(client.get(path), 404)


def test_root_links_the_playground(client: TestClient) -> None:
    root = client.get("/")
    assert root.status_code == 200
    assert "/playground" in links(root.text)
    assert (
        client.post("/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}}).status_code
        != 405
    )  # TGI's POST / stays


def test_api_answers_forbid_framing_too(client: TestClient) -> None:
    for response in (client.get("/health"), client.get("/no-such-route")):
        assert response.headers["x-frame-options"] == "SAMEORIGIN"
        assert response.headers["content-security-policy"] == "frame-ancestors 'self'"

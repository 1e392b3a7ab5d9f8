"""The playground in a real browser: Playwright drives Debian's chromium against a live
``mpo serve`` process on the tiny family (docs/playground.md).

Skipped, saying why, when chromium or the playwright package is missing; under CI
(``CI=true``, as .ci/run sets it, and installs both) they fail instead.

Run as a script, it takes the screenshots in docs/img from a server already running:
``python tests/server/test_playground_browser.py http://127.0.0.1:8000 docs/img``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-playground"
ADMIN_TOKEN = "admin-playground"
POLICIES = ["helpful", "harmless", "concise"]  # the tiny family's, in order
CHAT = "**/v1/chat/completions"


def missing(what: str) -> None:
    """Fail under CI (it installs the browser), else skip with the reason."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} (CI installs it: see .ci/run)")
    pytest.skip(what)


def chromium_path() -> str:
    path = os.environ.get("MPO_CHROMIUM") or shutil.which("chromium")
    if path is None:
        missing("chromium is not installed (apt-get install chromium)")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):  # a killed test run leaves no server behind
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def server(tiny_yaml: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("playground-home")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPO_HOME": str(home), "OMP_NUM_THREADS": "1",
           "MPO_API_KEY": API_KEY, "MPO_ADMIN_TOKEN": ADMIN_TOKEN}  # fmt: skip
    log = (home / "server.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--config", str(tiny_yaml), "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, (log.seek(0), log.read())[1]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become healthy"
        time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        # --no-sandbox: chromium refuses to start as root (containers) without it
        chromium = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@dataclass
class Session:
    page: Any
    url: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)

    def connect(self, admin: bool = False, key: str = API_KEY) -> None:
        from playwright.sync_api import expect

        self.page.goto(f"{self.url}/playground")
        self.page.fill("#api-key", key)
        if admin:
            self.page.fill("#admin-token", ADMIN_TOKEN)
        self.page.click("#connect")
        if key == API_KEY:
            expect(self.page.locator("#weights .slider-row")).to_have_count(len(POLICIES))

    def send(self, prompt: str) -> None:
        self.page.fill("#prompt", prompt)
        self.page.press("#prompt", "Enter")  # the keyboard path: Enter sends

    def chat_requests(self) -> list[dict[str, Any]]:
        return [r.post_data_json for r in self.requests if r.url.endswith("/v1/chat/completions")]


def open_session(browser: Any, url: str, width: int = 1280, height: int = 900) -> Session:
    context = browser.new_context(viewport={"width": width, "height": height})
    session = Session(context.new_page(), url)
    session.page.on(
        "console", lambda m: session.console_errors.append(m.text) if m.type == "error" else None
    )
    session.page.on("pageerror", lambda e: session.console_errors.append(str(e)))
    session.page.on("request", lambda r: session.requests.append(r))
    return session


@pytest.fixture
def session(browser: Any, server: str) -> Iterator[Session]:
    made = open_session(browser, server)
    yield made
    made.page.context.close()


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def api(server: str, token: str = API_KEY) -> httpx.Client:
    return httpx.Client(base_url=server, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def test_page_loads_without_console_errors(session: Session) -> None:
    session.page.goto(session.url)
    session.page.click("a[href='/playground']")  # linked from /
    expect(session.page.locator("#conn-status")).to_contain_text("needs an API key")
    session.connect()
    expect(session.page.locator("#conn-status")).to_contain_text("Connected to tiny")
    expect(session.page.locator("#legend .legend-item")).to_have_text(POLICIES)
    expect(session.page.locator("#strength")).to_be_enabled()  # the family has a reference
    assert session.console_errors == []
    assert session.requests and all(r.url.startswith(session.url) for r in session.requests)


def logprob_table(session: Session) -> dict[str, float | None]:
    """The inspector's rows: each member's log-prob (None: not run), and "blend"."""
    rows: dict[str, float | None] = {}
    for row in session.page.locator("#inspector tbody tr").all():
        cells = row.locator("td").all_inner_texts()
        rows[cells[0].strip()] = None if cells[1].startswith("not run") else float(cells[1])
    return rows


def hover_tables(session: Session, token: Any) -> int:
    """Hover ``token``; the number of tokens the inspector then shows."""
    token.hover()
    expect(session.page.locator("#inspector .inspect-title code")).to_have_text(
        json.dumps(token.get_attribute("data-text"), ensure_ascii=False)
    )
    return int(session.page.locator("#inspector table").count())


def test_slider_stream_colours_and_hover(session: Session, server: str) -> None:
    page = session.page
    session.connect()
    page.focus("#w-helpful")
    page.keyboard.press("Home")  # keyboard: the slider to its least, -2 (weights are signed)
    expect(page.locator("#w-helpful")).to_have_value("-2")
    for _ in range(20):  # then up to 0, a step of 0.1 at a time
        page.keyboard.press("ArrowRight")
    expect(page.locator("#w-helpful + output")).to_have_text("0%")
    page.fill("#max-tokens", "12")
    page.fill("#temperature", "0")
    session.send("Hello <b>there</b>")
    expect(page.locator(".reply.done")).to_have_count(1)
    expect(page.locator(".user")).to_have_text("Hello <b>there</b>")  # shown, not parsed

    sent = session.chat_requests()[-1]
    assert sent["weights"] == {"helpful": 0, "harmless": 1, "concise": 1}
    assert sent["stream"] is True and sent["logprobs"] is True
    # the streamed reply is the server's greedy reply, character for character
    body = {k: v for k, v in sent.items() if k != "stream"}
    with api(server) as http:
        whole = http.post("/v1/chat/completions", json=body).json()
    expect(page.locator(".reply-body")).to_have_text(whole["choices"][0]["message"]["content"])

    tokens = page.locator(".reply .tok")
    members = [t.get_attribute("data-member") for t in tokens.all()]
    assert members and set(members) <= {"harmless", "concise"}  # helpful (weight 0) never
    for token, member in zip(tokens.all(), members):
        assert f"m{POLICIES.index(member or '')}" in (token.get_attribute("class") or "")

    # a token of one piece (a character split over tokens shows each piece's table)
    single = next(i for i in range(len(members)) if hover_tables(session, tokens.nth(i)) == 1)
    table = logprob_table(session)
    assert set(table) == {"blend", *POLICIES}
    assert table["helpful"] is None
    blend = table["blend"]
    assert blend is not None
    margins = {m: lp - blend for m, lp in table.items() if m != "blend" and lp is not None}
    assert len(margins) == 2 and all(math.isfinite(v) for v in margins.values())
    favoured = page.locator("#inspector tr.favoured").get_attribute("data-member")
    assert favoured == max(margins, key=lambda m: margins[m]) == members[single]

    if len(members) > 1:  # keyboard: focus a token, the arrow moves to the next
        tokens.first.focus()
        page.keyboard.press("ArrowRight")
        expect(tokens.nth(1)).to_be_focused()
        title = json.dumps(tokens.nth(1).get_attribute("data-text"), ensure_ascii=False)
        expect(page.locator("#inspector .inspect-title code")).to_have_text(title)
    assert session.console_errors == []


def test_side_by_side(session: Session) -> None:
    page = session.page
    session.connect()
    page.fill("#max-tokens", "6")
    page.fill("#seed", "5")
    page.check("#compare")
    session.send("Compare these")
    replies = page.locator(".side-by-side .reply")
    expect(page.locator(".side-by-side .reply.done")).to_have_count(1 + len(POLICIES))
    labels = ["blend", *(f"{p} alone" for p in POLICIES)]
    expect(replies.locator(".reply-label")).to_have_text(labels)
    for index, policy in enumerate(POLICIES, start=1):  # alone, only that member runs
        members = (
            replies.nth(index)
            .locator(".tok")
            .evaluate_all("spans => spans.map(s => s.dataset.member)")
        )
        assert members and set(members) == {policy}
    sent = session.chat_requests()
    assert sorted(r["model"] for r in sent) == sorted(["tiny", *(f"tiny/{p}" for p in POLICIES)])
    assert {r["seed"] for r in sent} == {5}
    assert all(r["messages"] == sent[0]["messages"] for r in sent)
    assert session.console_errors == []


def test_save_profile_history_and_rollback(session: Session, server: str) -> None:
    page = session.page
    session.connect(admin=True)
    page.fill("#w-concise", "3")
    page.fill("#profile-name", "playground-brief")
    page.click("#save")
    versions = page.locator("ol.versions li")
    expect(versions).to_have_count(1)
    with api(server, ADMIN_TOKEN) as http:
        first = http.get("/admin/profiles/playground-brief").json()
    assert first["version"] == 1 and first["meta"] == {"source": "playground"}
    assert first["weights"] == pytest.approx({"helpful": 0.2, "harmless": 0.2, "concise": 0.6})
    expect(page.locator("#profile")).to_have_value("playground-brief")

    page.fill("#w-concise", "1")
    page.click("#save")
    expect(versions).to_have_count(2)
    page.click("text=Roll back to v1")
    expect(versions).to_have_count(3)
    with api(server, ADMIN_TOKEN) as http:
        newest = http.get("/admin/profiles/playground-brief").json()
    assert newest["version"] == 3 and newest["meta"]["rollback_of"] == 1
    assert newest["weights"] == pytest.approx(first["weights"])
    expect(page.locator("#w-concise + output")).to_have_text("60%")  # the sliders follow
    expect(versions.nth(2)).to_contain_text("rollback to v1")
    assert session.console_errors == []


def fulfil_error(status: int, message: str, retry_after: str) -> Callable[[Any], None]:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}

    def handle(route: Any) -> None:
        route.fulfill(status=status, headers={"Retry-After": retry_after}, json=body)

    return handle


def test_errors_are_shown_in_words(session: Session) -> None:
    page = session.page
    error = page.locator("#error")
    session.connect(key="sk-wrong")
    expect(error).to_contain_text("Not authorised (401)")

    session.connect()
    expect(error).to_be_hidden()
    page.fill("#temperature", "-1")
    session.send("Hi")
    expect(error).to_contain_text('refused the parameter "temperature"')
    expect(page.locator(".reply.failed")).to_have_count(1)
    page.fill("#temperature", "1")

    # 429 and 503 with Retry-After, as the server sends them when full or draining
    page.route(CHAT, fulfil_error(429, "the server is at capacity", "7"))
    session.send("Hi")
    expect(error).to_contain_text("busy (429)")
    expect(error).to_contain_text("Try again in 7 s")
    page.unroute(CHAT)
    page.route(CHAT, fulfil_error(503, "the server is shutting down", "3"))
    session.send("Hi")
    expect(error).to_contain_text("unavailable (503): the server is shutting down")
    expect(error).to_contain_text("Try again in 3 s")


def running(server: str) -> float:
    with api(server) as http:
        text = http.get("/metrics").text
    for line in text.splitlines():
        if line.startswith("mpo_num_requests_running "):
            return float(line.split()[1])
    return 0.0


def test_stop_cancels_the_stream(session: Session, server: str) -> None:
    page = session.page
    session.connect()

    def endless(route: Any) -> None:  # no early end of sequence: the reply runs to the limit
        body = route.request.post_data_json
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route(CHAT, endless)
    page.fill("#max-tokens", "200")
    session.send("Go on")
    expect(page.locator(".reply .tok").first).to_be_visible()
    page.click("#stop")
    expect(page.locator(".reply-status")).to_have_text("stopped")
    expect(page.locator("#send")).to_be_enabled()
    deadline = time.monotonic() + 10  # the server sees the disconnect and frees the slot
    while running(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(server) == 0


def test_model_output_is_shown_as_text(session: Session) -> None:
    page = session.page
    session.connect()
    reply = "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>"
    schema = {"type": "string", "enum": [reply]}  # the server's grammar makes the model say it

    def constrain(route: Any) -> None:
        body = route.request.post_data_json
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "markup", "schema": schema}}  # fmt: skip
        route.continue_(post_data=json.dumps(body))

    page.route(CHAT, constrain)
    page.fill("#max-tokens", "200")
    session.send("Say it")
    expect(page.locator(".reply.done")).to_have_count(1)
    expect(page.locator(".reply-body")).to_have_text(json.dumps(reply))
    assert page.locator("#history script, #history img").count() == 0
    assert page.evaluate("() => window.pwned") is None
    assert session.console_errors == []

    # A whole tag in one chunk (a tokenizer with such tokens): still text.
    tag = "<img src=x onerror='window.pwned = 3'>"
    entry = {"token": tag, "logprob": -1.0, "policy_logprobs": dict.fromkeys(POLICIES, -0.5)}
    chunk = {"choices": [{"index": 0, "delta": {"content": tag}, "logprobs": {"content": [entry]},
                          "finish_reason": "stop"}]}  # fmt: skip
    stream = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
    page.unroute(CHAT)
    page.route(CHAT, lambda route: route.fulfill(content_type="text/event-stream", body=stream))
    session.send("Once more")
    expect(page.locator(".reply.done")).to_have_count(2)
    expect(page.locator(".reply-body").nth(1)).to_have_text(tag)
    assert page.locator("#history img").count() == 0
    assert page.evaluate("() => window.pwned") is None


def test_phone_width(browser: Any, server: str) -> None:
    phone = open_session(browser, server, width=390, height=844)
    try:
        phone.connect()
        page = phone.page
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
        controls = page.locator(".controls").bounding_box()
        chat = page.locator(".chat").bounding_box()
        assert controls is not None and chat is not None
        assert chat["y"] >= controls["y"] + controls["height"]  # one column
        assert chat["width"] <= 390
        page.fill("#max-tokens", "4")
        phone.send("Hi")
        expect(page.locator(".reply.done")).to_have_count(1)
        page.locator(".reply .tok").first.click()  # a tap: the token's log-probs show
        expect(page.locator("#inspector tbody tr")).to_have_count(1 + len(POLICIES))
        assert phone.console_errors == []
    finally:
        phone.page.context.close()


def screenshots(url: str, out: Path) -> None:
    """Desktop (1280 wide) and phone (390 wide) screenshots of a blend and its
    side-by-side view, from the server at ``url`` (no API key; docs/playground.md)."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    prompt = "How do I keep houseplants healthy?"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=chromium_path(), args=["--no-sandbox"]
        )
        for name, width, height in (("desktop", 1280, 900), ("phone", 390, 844)):
            shot = open_session(chromium, url, width, height)
            page = shot.page
            page.goto(f"{url}/playground")
            expect(page.locator("#weights .slider-row").first).to_be_visible()
            page.fill("#max-tokens", "40")
            page.fill("#seed", "3")
            shot.send(prompt)
            expect(page.locator(".reply.done")).to_have_count(1)
            page.locator(".reply .tok").nth(2).hover()
            page.screenshot(path=str(out / f"playground-{name}.png"), full_page=name == "phone")
            if name == "desktop":
                page.check("#compare")
                shot.send(prompt)
                expect(page.locator(".side-by-side .reply.done")).to_have_count(4)
                page.locator(".side-by-side").scroll_into_view_if_needed()
                page.screenshot(path=str(out / "playground-side-by-side.png"))
            page.context.close()
        chromium.close()


if __name__ == "__main__":
    screenshots(sys.argv[1], Path(sys.argv[2]))

"""The web playground at /, driven in headless Debian Chromium by Playwright (never a downloaded browser).

Against the live embedded model: a streamed answer with real stats, Stop reaching the engine, the
server's 400 text, the API key, regenerate / edit, the completion tab, conversations kept, exported and
imported. Responses the embedded server cannot be made to give on demand (429, 503, a dropped
connection) are answered by Playwright's router with the server's shapes. Every test checks that no
request left for another host and that the page raised no error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from llamaserve.engine.async_engine import AsyncEngine
from llamaserve.server.app import create_app
from llamaserve.server.settings import ServerSettings
from tests.e2e.conftest import MODEL, Live, serve_app

sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright (make test installs it)")
CHROMIUM = os.environ.get("LLAMASERVE_CHROMIUM", "/usr/bin/chromium")
if not shutil.which(CHROMIUM):
    if os.environ.get("CI"):  # CI installs it (make browser): a skip there would hide these tests
        raise RuntimeError(f"no Chromium at {CHROMIUM} in CI: `make browser` should have installed it")
    pytest.skip(f"no Chromium at {CHROMIUM} (make test installs Debian's chromium package)",
                allow_module_level=True)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sync_api.BrowserContext]:
    """One Chromium for the module; each test gets a fresh context (its own storage) from `page`."""
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def open_server(engine: AsyncEngine) -> Iterator[Live]:
    """A keyless server over the shared engine, as `make serve` runs it."""
    with serve_app(create_app(engine, ServerSettings(), MODEL), engine, key="") as live:
        yield live


class Watched:
    """A page and what it did: every request's URL, and page errors."""

    def __init__(self, context: sync_api.BrowserContext, base: str) -> None:
        self.context = context
        self.base = base
        self.page = context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.urls: list[str] = []
        self.errors: list[str] = []
        self.expected: list[str] = []  # console errors a test provokes on purpose
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     and "Failed to load resource" not in m.text else None)

    def open(self) -> sync_api.Page:
        self.page.goto(self.base + "/")
        self.page.wait_for_selector("body[data-ready=true]")
        return self.page

    def check(self) -> None:
        own = urlsplit(self.base).netloc
        foreign = [u for u in self.urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")
                   and urlsplit(u).netloc != own]
        assert not foreign, f"requests left for other hosts: {foreign}"
        errors = [e for e in self.errors if not any(x in e for x in self.expected)]
        assert not errors, f"page errors: {errors}"


@pytest.fixture
def watched(browser: sync_api.Browser, request: pytest.FixtureRequest) -> Iterator[Watched]:
    live: Live = request.getfixturevalue(getattr(request, "param", "open_server"))
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    w = Watched(context, live.url)
    yield w
    try:
        w.check()
    finally:
        context.close()


def settings(page: sync_api.Page, **values: str) -> None:
    details = page.locator("#settings")
    if details.get_attribute("open") is None:
        page.locator("#settings summary").click()
    for name, value in values.items():
        page.fill(f"#{name}", value)


def ask(page: sync_api.Page, text: str) -> sync_api.Locator:
    """Type `text`, press Enter, wait for the answer to finish; the last assistant message."""
    before = page.get_by_test_id("message-assistant").count()
    page.get_by_test_id("prompt").fill(text)
    page.get_by_test_id("prompt").press("Enter")
    answer = page.get_by_test_id("message-assistant").nth(before)
    answer.wait_for()
    page.wait_for_function("() => !document.querySelector('[data-testid=send]').disabled")
    return answer


def running(live: Live) -> float:
    text = httpx.get(f"{live.url}/metrics", headers=live.headers if live.key else {}).text
    return float(re.search(r"^llamaserve_num_requests_running (\S+)$", text, re.M).group(1))


def numbers(stats: sync_api.Locator, testid: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", stats.get_by_test_id(testid).inner_text())]


def test_a_streamed_answer_appears_with_the_servers_numbers(watched: Watched, open_server: Live) -> None:
    page = watched.open()
    assert page.get_by_test_id("model-name").inner_text() == MODEL
    assert str(open_server.engine.max_model_len) in page.get_by_test_id("model-ctx").inner_text()
    assert page.get_by_test_id("api-key").is_hidden()  # no keys on this server
    assert page.get_by_test_id("completion-prompt").is_hidden() and page.get_by_test_id("prompt").is_visible()
    assert page.locator("#temperature").input_value() == "1"  # the server's defaults
    assert page.locator("#top_k").input_value() == "0"
    settings(page, temperature="0", max_tokens="20")
    page.get_by_test_id("system-prompt").fill("You are terse.")
    # Shift+Enter is a new line, not a send
    page.get_by_test_id("prompt").fill("Name a colour.")
    page.get_by_test_id("prompt").press("Shift+Enter")
    page.get_by_test_id("prompt").type("Just one word.")
    assert page.get_by_test_id("prompt").input_value() == "Name a colour.\nJust one word."
    assert page.get_by_test_id("message-user").count() == 0
    with page.expect_request("**/v1/chat/completions") as sent:
        answer = ask(page, page.get_by_test_id("prompt").input_value())
    body = json.loads(sent.value.post_data)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert body["temperature"] == 0 and body["max_tokens"] == 20
    assert page.get_by_test_id("message-user").inner_text().endswith("Name a colour.\nJust one word.")
    assert answer.locator(".body").inner_text().strip()
    assert answer.get_by_test_id("message-error").count() == 0

    # The stats are the server's: the same request, not streamed, gives the same counts.
    stats = answer.get_by_test_id("stats")
    ref = httpx.post(f"{open_server.url}/v1/chat/completions", timeout=60, json={
        k: v for k, v in body.items() if k not in ("stream", "stream_options")}).json()["usage"]
    prompt, cached = numbers(stats, "stat-prompt")
    assert prompt == ref["prompt_tokens"] and 0 <= cached <= prompt
    assert numbers(stats, "stat-generated") == [ref["completion_tokens"]]
    used, limit = numbers(stats, "stat-context")
    assert used == ref["prompt_tokens"] + ref["completion_tokens"]
    assert limit == open_server.engine.max_model_len
    assert float(stats.get_by_test_id("stat-ttft").inner_text().split()[1]) > 0
    assert float(stats.get_by_test_id("stat-speed").inner_text().split()[0]) > 0


def test_stop_aborts_the_request_on_the_server(watched: Watched, open_server: Live) -> None:
    page = watched.open()
    settings(page, max_tokens="3000", seed="1")
    page.get_by_test_id("prompt").fill("Write a very long story about a llama who learns to sail.")
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("message-assistant").last
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('[data-testid=message-assistant] .body')].pop();"
        " return m && m.textContent.trim().length > 0; }")
    assert running(open_server) >= 1
    page.get_by_test_id("stop").click()
    deadline = time.monotonic() + 10
    while running(open_server) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(open_server) == 0
    answer.get_by_test_id("stat-stopped").wait_for()
    assert answer.locator(".body").inner_text().strip()  # what arrived stays
    assert page.get_by_test_id("send").is_enabled() and page.get_by_test_id("stop").is_disabled()


def test_a_400_shows_what_the_server_said(watched: Watched, open_server: Live) -> None:
    page = watched.open()
    settings(page, max_tokens="100000")
    answer = ask(page, "Hello")
    error = answer.get_by_test_id("message-error").inner_text()
    limit = open_server.engine.max_model_len
    assert "(400)" in error and f"context length is {limit} tokens" in error and "100000" in error
    settings(page, max_tokens="", temperature="5")
    error = ask(page, "Hello").get_by_test_id("message-error").inner_text()
    assert "(400)" in error and "temperature" in error and "less than or equal to 2" in error
    # a schema that is not JSON is refused before anything is sent, and the message stays in the box
    settings(page, temperature="", **{"json-schema": "{not json"})
    sent = len(watched.urls)
    page.get_by_test_id("prompt").fill("Hello again")
    page.get_by_test_id("send").click()
    sync_api.expect(page.get_by_test_id("error")).to_contain_text("does not hold valid JSON")
    assert len(watched.urls) == sent and page.get_by_test_id("prompt").input_value() == "Hello again"


@pytest.mark.parametrize("watched", ["server"], indirect=True)
def test_with_api_keys_the_page_shows_401_until_the_key_is_entered(watched: Watched, server: Live) -> None:
    page = watched.open()
    assert "(401)" in page.get_by_test_id("error").inner_text()
    assert page.get_by_test_id("api-key").is_visible()
    settings(page, max_tokens="4")
    assert "(401)" in ask(page, "Hi").get_by_test_id("message-error").inner_text()
    page.get_by_test_id("api-key").fill("wrong")
    with page.expect_response("**/v1/models") as refused:
        page.get_by_test_id("save-key").click()
    assert refused.value.status == 401 and refused.value.request.headers["authorization"] == "Bearer wrong"
    sync_api.expect(page.get_by_test_id("error")).to_contain_text("(401)")
    page.get_by_test_id("api-key").fill(server.key)
    page.get_by_test_id("save-key").click()
    page.get_by_test_id("model-name").filter(has_text=MODEL).wait_for()
    assert page.get_by_test_id("error").is_hidden()
    answer = ask(page, "Hi")
    assert answer.get_by_test_id("message-error").count() == 0
    assert numbers(answer.get_by_test_id("stats"), "stat-generated")[0] >= 1
    page.reload()  # the key is kept in this browser
    page.wait_for_selector("body[data-ready=true]")
    assert page.get_by_test_id("model-name").inner_text() == MODEL


@pytest.mark.parametrize(("status", "headers", "body", "expected"), [
    (429, {"Retry-After": "7"}, {"error": {"message": "the queue is full (256 waiting)", "type": "x"}},
     ["(429)", "the queue is full (256 waiting)", "Retry after 7 s"]),
    (503, {}, {"error": {"message": "the server is draining", "type": "x"}},
     ["(503)", "the server is draining"]),
    (None, {}, None, ["connection to the server was lost"]),
])
def test_busy_unavailable_and_dropped_are_explained(watched: Watched, status: int | None, headers: dict,
                                                    body: dict | None, expected: list[str]) -> None:
    page = watched.open()

    def answer(route: sync_api.Route) -> None:
        if status is None:
            route.abort("connectionreset")
        else:
            route.fulfill(status=status, headers={**headers, "Content-Type": "application/json"},
                          body=json.dumps(body))

    page.route("**/v1/chat/completions", answer)
    error = ask(page, "Hi").get_by_test_id("message-error").inner_text()
    for text in expected:
        assert text in error


def test_regenerate_and_edit_the_last_message(watched: Watched) -> None:
    page = watched.open()
    settings(page, max_tokens="6", temperature="0")
    ask(page, "Say hello.")
    first = page.get_by_test_id("message-assistant").locator(".body").inner_text()
    assert first.strip()
    with page.expect_request("**/v1/chat/completions") as sent:
        page.get_by_test_id("regenerate").click()
    page.wait_for_function("() => !document.querySelector('[data-testid=send]').disabled")
    assert [m["role"] for m in json.loads(sent.value.post_data)["messages"]] == ["user"]
    assert page.get_by_test_id("message-assistant").count() == 1  # replaced, not added
    again = page.get_by_test_id("message-assistant")
    assert again.locator(".body").inner_text() == first  # greedy, now from the prefix cache: the same
    assert "(cached 32)" in again.get_by_test_id("stat-prompt").inner_text()
    page.get_by_test_id("edit").click()
    assert page.get_by_test_id("prompt").input_value() == "Say hello."
    assert page.get_by_test_id("message-user").count() == 0
    ask(page, "Say goodbye.")
    assert page.get_by_test_id("message-user").inner_text().endswith("Say goodbye.")
    assert page.get_by_test_id("message-assistant").count() == 1


def test_raw_completion_tab(watched: Watched) -> None:
    page = watched.open()
    settings(page, max_tokens="8", temperature="0")
    page.get_by_test_id("tab-completion").click()
    page.get_by_test_id("completion-prompt").fill("The capital of France is")
    with page.expect_request("**/v1/completions") as sent:
        page.get_by_test_id("completion-send").click()
    page.get_by_test_id("completion-stats").get_by_test_id("stat-generated").wait_for()
    assert json.loads(sent.value.post_data)["prompt"] == "The capital of France is"
    assert page.get_by_test_id("completion-output").inner_text().strip()
    assert numbers(page.get_by_test_id("completion-stats"), "stat-generated")[0] <= 8


def test_conversations_are_kept_exported_and_imported(watched: Watched, tmp_path: Path) -> None:
    page = watched.open()
    hostile = '<img src=x onerror="window.pwned=1">'
    # DOMPurify strips the handler; parsing it in the page still makes Chromium report the CSP it breaks
    watched.expected.append("violates the following Content Security Policy directive")
    upload = tmp_path / "in.json"
    upload.write_text(json.dumps({"conversations": [{"title": "Imported", "system": "Be brief.", "messages": [
        {"role": "user", "content": "Show code"},
        {"role": "assistant", "content": f"**Sure**:\n\n```python\nprint(1)\n```\n\n{hostile}"}]}]}))
    page.get_by_test_id("import").set_input_files(upload)
    page.get_by_test_id("conversation-title").filter(has_text="Imported").wait_for()
    answer = page.get_by_test_id("message-assistant")
    assert answer.locator("pre code").inner_text().strip() == "print(1)"  # Markdown, with its code block
    assert answer.locator("strong").inner_text() == "Sure"
    assert page.evaluate("() => window.pwned") is None
    assert answer.locator("img[onerror]").count() == 0
    assert page.get_by_test_id("system-prompt").input_value() == "Be brief."

    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.get_by_test_id("conversation-title").filter(has_text="Imported").count() == 1
    with page.expect_download() as download:
        page.get_by_test_id("export").click()
    exported = json.loads(Path(download.value.path()).read_text())
    convs = [c for c in exported["conversations"] if c["title"] == "Imported"]
    assert len(convs) == 1 and convs[0]["messages"][0] == {"role": "user", "content": "Show code"}

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"conversations": [{"messages": [{"role": "wizard", "content": 1}]}]}))
    page.get_by_test_id("import").set_input_files(bad)
    sync_api.expect(page.get_by_test_id("error")).to_contain_text("Could not import bad.json")
    page.get_by_test_id("conversation-title").filter(has_text="Imported").wait_for()

    page.get_by_test_id("conversation-delete").first.click()
    assert page.get_by_test_id("conversation-title").filter(has_text="Imported").count() == 0
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.get_by_test_id("conversation-title").filter(has_text="Imported").count() == 0


@pytest.mark.parametrize(("name", "viewport"), [("desktop", (1280, 800)), ("phone", (390, 844))])
def test_usable_at_desktop_and_phone_sizes(browser: sync_api.Browser, open_server: Live, tmp_path: Path,
                                           name: str, viewport: tuple[int, int]) -> None:
    """Everything fits the width, the controls are reachable; screenshots go to LLAMASERVE_SCREENSHOTS."""
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    try:
        w = Watched(context, open_server.url)
        page = w.open()
        settings(page, max_tokens="40", temperature="0", seed="0")
        page.locator("#settings summary").click()  # closed again for the picture
        ask(page, "Write a Python function that adds two numbers, in a code block.")
        assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport[0]
        for testid in ("prompt", "send", "stop"):
            box = page.get_by_test_id(testid).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= viewport[0]
            assert box["y"] + box["height"] <= viewport[1]
        if name == "phone":
            assert not page.get_by_test_id("sidebar").is_visible() or \
                page.get_by_test_id("sidebar").bounding_box()["x"] < 0
            page.locator("#open-sidebar").click()
            page.get_by_test_id("new-chat").wait_for(state="visible")
        out = Path(os.environ.get("LLAMASERVE_SCREENSHOTS", tmp_path))
        out.mkdir(parents=True, exist_ok=True)
        if name == "phone":
            page.locator("#close-sidebar").click()
            page.wait_for_timeout(300)
        page.screenshot(path=str(out / f"ui-{name}.png"))
        w.check()
    finally:
        context.close()

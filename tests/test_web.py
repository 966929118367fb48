"""The web page at / in a real headless browser (Debian's chromium driven by Playwright) against a real server.

The README screenshot comes from the slow test, on the embedded model:
    MEDASSIST_SCREENSHOT=docs/screenshot.png [MEDASSIST_ADAPTER=checkpoints/.../lora_adapter] pytest tests/test_web.py -m slow
"""

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_serve import start_server, stop_server

from medassist import safety

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-extensions", "--no-first-run"]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine: apt-get install -y chromium")


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev dependency)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def open_page(browser, url: str, offsite: list):
    """A page on `url` where any request to another host is refused and recorded (the page must work offline)."""
    page = browser.new_page(viewport={"width": 900, "height": 1000})
    host = urlsplit(url).netloc

    def only_local(route):
        if urlsplit(route.request.url).netloc == host:
            route.continue_()
        else:
            offsite.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(url + "/")
    return page


def ask(page, question: str, timeout_ms: int = 60_000) -> None:
    """Type a question, send it with Enter, and wait until the answer has finished streaming."""
    turns = page.locator(".turn").count()
    page.fill("#question", question)
    page.press("#question", "Enter")
    page.locator(".turn").nth(turns).locator(".disclaimer").wait_for(state="visible", timeout=timeout_ms)
    page.wait_for_function("!document.getElementById('send').disabled", timeout=timeout_ms)


@pytest.fixture(scope="module")
def server(adapter, tiny_model_dir, tmp_path_factory):
    proc, url = start_server(tmp_path_factory.mktemp("web") / "server.log", "--adapter", str(adapter),
                             "--base-model", str(tiny_model_dir), "--max-new-tokens", "24")
    yield url
    stop_server(proc)


def sent_messages(page) -> list:
    """The "messages" of every chat request the page sends, in order."""
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)["messages"])
            if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def test_page_streams_answers_with_disclaimer_banner_and_keeps_the_conversation(browser, server):
    offsite = []
    page = open_page(browser, server, offsite)
    assert page.title() == "medassist"
    sent = sent_messages(page)

    ask(page, "What is asthma?")
    first = page.locator(".turn").nth(0)
    assert first.locator(".user").inner_text() == "What is asthma?"
    assert first.locator(".disclaimer").inner_text().strip().endswith(safety.DISCLAIMER)
    assert not first.locator(".emergency").is_visible()
    assert safety.DISCLAIMER not in first.locator(".text").inner_text()  # shown once, in its own box

    ask(page, "I have crushing chest pain and I'm sweating right now")
    second = page.locator(".turn").nth(1)
    assert second.locator(".emergency").is_visible()
    assert safety.EMERGENCY_LINE in second.locator(".emergency").inner_text()
    assert safety.EMERGENCY_LINE not in second.locator(".text").inner_text()
    assert page.locator(".turn").count() == 2 and first.locator(".user").is_visible()  # the conversation stays
    # the follow-up went with the first exchange: the answer as shown, without its disclaimer
    shown = first.locator(".text").inner_text().strip()
    assert sent[1][:2] == [{"role": "user", "content": "What is asthma?"}, {"role": "assistant", "content": shown}]
    assert sent[1][2]["content"].startswith("I have crushing chest pain") and len(sent[1]) == 3

    page.click("#reset")  # New: the page forgets the conversation
    assert page.locator(".turn").count() == 0
    ask(page, "Is it contagious?")
    assert sent[-1] == [{"role": "user", "content": "Is it contagious?"}]
    assert offsite == []  # no CDN, no fonts, nothing outside the server


def test_page_shows_a_server_error_and_asks_for_the_api_key(browser, adapter, tiny_model_dir, tmp_path):
    proc, url = start_server(tmp_path / "server.log", "--adapter", str(adapter), "--base-model", str(tiny_model_dir),
                             "--max-new-tokens", "8", "--api-key", "sesame")
    try:
        page = open_page(browser, url, [])
        page.fill("#question", "What is flu?")
        page.press("#question", "Enter")
        page.locator(".error").wait_for(timeout=30_000)
        assert "401" in page.locator(".error").inner_text() and page.locator("#settings").get_attribute("open") == ""
        page.fill("#key", "sesame")
        ask(page, "What is flu?")
        assert page.locator(".turn").nth(1).locator(".disclaimer").is_visible()
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_embedded_model_in_the_page_and_the_readme_screenshot(browser, tmp_path):
    adapter_dir = os.environ.get("MEDASSIST_ADAPTER")
    args = ["--adapter", adapter_dir] if adapter_dir else []
    proc, url = start_server(tmp_path / "server.log", *args, "--max-new-tokens", "80", timeout=240)
    try:
        page = open_page(browser, url, [])
        sent = sent_messages(page)
        ask(page, "What is asthma?", timeout_ms=120_000)
        ask(page, "And in children?", timeout_ms=120_000)  # a follow-up: only makes sense with the first turn
        assert all(page.locator(".turn").nth(i).locator(".text").inner_text().strip() for i in (0, 1))  # real answers
        assert [m["content"] for m in sent[1]][::2] == ["What is asthma?", "And in children?"]
        shot = Path(os.environ.get("MEDASSIST_SCREENSHOT") or tmp_path / "screenshot.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        assert shot.stat().st_size < 300_000
    finally:
        stop_server(proc)

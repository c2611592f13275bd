"""The browser chat page (08_deployment/chat.html), driven in headless Chromium: what it streams into the page is what
the API returns for the same conversation, history is kept across turns, and a server error shows as an error."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
import torch

from ch01.char_tokenizer import CharTokenizer
from ch01.model import GPT, GPTConfig
from ch08.serve_thread import ServerThread
from ch08.server import build_state
from common.data import load_shakespeare

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the chat page test needs playwright: pip install playwright"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="the chat page test needs Chromium: apt-get install chromium")


@pytest.fixture(scope="module")
def server(one_thread):
    tok = CharTokenizer.from_text(load_shakespeare())
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=256)).eval()
    state = build_state(model, tok, "tiny-chat", max_batch=4, shutdown_timeout=2.0)
    with ServerThread(state) as u:
        yield u, state


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page()
        pg.goto(url + "/")
        yield pg
        browser.close()


def api_reply(url: str, messages: list[dict], max_tokens: int) -> str:
    body = {"model": "tiny-chat", "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('ready —')"
                           " || document.getElementById('status').className === 'error'", timeout=60_000)  # fmt: skip


def test_page_streams_what_the_api_returns_and_keeps_history(url, page):
    page.wait_for_function("document.getElementById('model').textContent === 'model: tiny-chat'")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    send(page, "ROMEO: speak")
    first = page.locator(".assistant").last.text_content()
    assert "12 tokens in" in page.locator("#status").text_content()  # the server's usage count, with tokens/s
    assert first == api_reply(url, [{"role": "user", "content": "ROMEO: speak"}], 12)
    send(page, "JULIET: again")
    history = [
        {"role": "user", "content": "ROMEO: speak"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "JULIET: again"},
    ]
    assert page.locator(".assistant").last.text_content() == api_reply(url, history, 12)
    assert page.locator(".user").count() == 2


def test_stop_keeps_the_partial_reply(server, page, monkeypatch):
    scheduler = server[1].scheduler
    step = scheduler._step

    def slow_step(*args, **kwargs):  # 20 ms a token, so the click surely lands mid-reply
        time.sleep(0.02)
        return step(*args, **kwargs)

    monkeypatch.setattr(scheduler, "_step", slow_step)
    page.click("#clear")  # a fresh conversation: 200 new tokens fit the 256-token context
    page.fill("#max-tokens", "200")
    page.fill("#input", "a long answer please")
    page.press("#input", "Enter")
    page.wait_for_function(
        "(a => a.length > 0 && a[0].textContent.length > 0)(document.querySelectorAll('.assistant'))"
    )
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'ready — stopped'")
    assert 0 < len(page.locator(".assistant").last.text_content()) < 200
    assert page.is_disabled("#stop") and not page.is_disabled("#send")


def test_server_error_is_shown_and_the_turn_dropped(page):
    before = page.locator(".assistant").count()
    page.fill("#max-tokens", "100000")  # beyond the model's context: the server answers 400
    send(page, "too long a reply")
    assert page.locator("#status").get_attribute("class") == "error"
    assert "error" in page.locator("#status").text_content()
    assert page.locator(".assistant").count() == before

"""`huayu webui`: the chat handler in-process, then the real page in headless Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from huayu.generation import EVA_BEAM
from huayu.serve.webui import decoding_options, stream_reply

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[1]
SLIDERS = dict(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=16, repetition_penalty=1.2)


class EchoModel:
    """Stands in for a ChatModel: records each call and replies "好的" one character at a time."""

    def __init__(self):
        self.calls = []

    def stream_chat(self, query, history, system=None, **decoding):
        self.calls.append((query, history, system, decoding))
        yield "好", None
        yield "好的", None


def test_stream_reply_sends_the_whole_dialogue_and_streams_the_reply():
    # the chatbot hands its messages over as Gradio does: content as a list of parts
    shown = [{"role": "user", "content": [{"type": "text", "text": "你好"}], "metadata": None},
             {"role": "assistant", "content": [{"type": "text", "text": "你好！"}], "metadata": None}]
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    model = EchoModel()
    out = list(stream_reply(model, "你是谁？", shown, system="你是助手", max_new_tokens=5))
    assert model.calls == [("你是谁？", history, "你是助手", {"max_new_tokens": 5})]
    asked = history + [{"role": "user", "content": "你是谁？"}]
    assert out == [asked] + [asked + [{"role": "assistant", "content": r}] for r in ("好", "好的")]


def test_stream_reply_ignores_a_blank_message():
    model = EchoModel()
    assert list(stream_reply(model, "  ", [])) == [[]]
    assert model.calls == []


def test_decoding_options_sample_with_the_sliders_or_use_the_beam_preset():
    assert decoding_options(False, **SLIDERS) == {"do_sample": True, "num_beams": 1, **SLIDERS}
    assert decoding_options(True, **SLIDERS) == {**EVA_BEAM, "max_new_tokens": 16}


# --- the page in a browser ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(condition, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def webui_url(tiny_model_dir, tmp_path_factory):
    """`huayu webui` on the tiny model in a subprocess; its URL once the port answers."""
    port, log_path = _free_port(), tmp_path_factory.mktemp("webui") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "huayu.cli", "webui", tiny_model_dir, "--port", str(port), "--max-new-tokens", "48"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def answers() -> bool:
        assert proc.poll() is None, f"webui exited with {proc.returncode}:\n{log_path.read_text()}"
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait_for(answers, 90, f"{url} to answer", poll=0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by the system chromedriver (Selenium Manager never downloads)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium/chromedriver not installed (make browser installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# Records the length of the newest reply on every change Gradio makes to the chatbot.
RECORD_REPLY_LENGTHS = """
window.replyLengths = [];
const chatbot = document.getElementById('chatbot');
new MutationObserver(() => {
  const replies = chatbot.querySelectorAll('[data-testid="bot"] .message-content');
  if (replies.length) window.replyLengths.push(replies[replies.length - 1].textContent.trim().length);
}).observe(chatbot, {childList: true, subtree: true, characterData: true});
"""


def _texts(driver, role: str) -> list[str]:
    """The chatbot's messages of `role` ("user" or "bot"), read in one go (Gradio re-renders them)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent.trim())",
        f'#chatbot [data-testid="{role}"] .message-content')


def _send(driver, text: str) -> str:
    """Type `text`, press Enter, and return the reply once it has stopped growing."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    replies_before = len(_texts(driver, "bot"))
    driver.find_element(By.CSS_SELECTOR, "#msg textarea").send_keys(text, Keys.ENTER)
    _wait_for(lambda: len(_texts(driver, "bot")) > replies_before and _texts(driver, "bot")[-1], 30, "a reply")
    seen = []  # the reply, sampled until it is the same three times running

    def settled() -> bool:
        seen.append(_texts(driver, "bot")[-1])
        return len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]

    _wait_for(settled, 30, "the reply to settle", poll=0.3)
    return seen[-1]


def test_webui_chats_streams_and_clears_in_a_browser(webui_url, browser):
    from selenium.webdriver.common.by import By

    browser.get(webui_url)
    _wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#msg textarea"), 30, "the page to load")
    assert "华语 huayu chat" in browser.title
    browser.execute_script(RECORD_REPLY_LENGTHS)

    first = _send(browser, "你好")
    lengths = browser.execute_script("return window.replyLengths")
    grown = sorted({n for n in lengths if n})
    assert len(grown) >= 2 and grown[-1] == len(first), f"the reply did not stream: lengths {lengths}"

    _send(browser, "你是谁？")
    assert _texts(browser, "user") == ["你好", "你是谁？"]
    assert len(_texts(browser, "bot")) == 2 and _texts(browser, "bot")[0] == first

    browser.find_element(By.ID, "clear").click()
    _wait_for(lambda: not _texts(browser, "user") and not _texts(browser, "bot"), 10, "the chatbot to clear")

    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(r.startswith(webui_url) for r in resources), "the page fetched from elsewhere"


def test_sliders_not_set_start_where_the_model_s_generation_config_puts_them():
    from huayu.generation import DecodingArgs
    from huayu.serve.webui import WebUIConfig, start_sliders

    cfg = WebUIConfig(temperature=1.1)
    start_sliders(cfg, {"temperature"}, DecodingArgs(temperature=0.3, top_p=0.8, top_k=20, max_new_tokens=99))
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens) == (1.1, 0.8, 20, 99)

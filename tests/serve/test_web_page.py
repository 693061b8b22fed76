"""The web page of ``vlkit serve`` in a real headless browser (Debian's chromium and its driver, as ``.ci/run``
installs them) against the real server started as a user would (``python -m vlkit serve --model RUN``): the page
uploads an image and shows the streamed chat answer, the search thumbnails, the zero-shot labels or the top-5 classes.

With ``VLKIT_SCREENSHOTS=1`` each test also saves its page to ``docs/img/serve-*.png`` (the screenshots in the docs).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "img"
WAIT_S = 30  # a generous bound for one step on a busy 2-core CI machine; a passing run waits far less

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromedriver (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the whole module (starting one costs about a second)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # --no-sandbox: CI runs as root, where chromium refuses its sandbox; /dev/shm is small in containers.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,760"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(run: Path, log: Path, *extra: str) -> Iterator[str]:
    """``vlkit serve`` in a subprocess on a free port; yields its base URL once /health answers."""
    port = _free_port()
    command = [sys.executable, "-m", "vlkit", "serve", "--model", str(run), "--port", str(port), *extra]
    env = {k: v for k, v in os.environ.items() if k != "VLKIT_API_KEY"}  # the key is the test's choice, not the shell's
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"vlkit serve exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"vlkit serve did not answer /health:\n{log.read_text()}"
            with contextlib.suppress(OSError):  # not listening yet
                if _api(url, "/health")[0] == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _api(url: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    """GET (or POST ``body`` as JSON to) the server: status and JSON answer, errors included."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def _open(browser, url: str) -> None:
    """Loads the page and waits until it has asked /v1/models what is served and shown that view."""
    browser.get(url + "/")
    _wait_ready(browser)
    assert not _error_text(browser)


def _wait_ready(browser) -> None:
    _wait(browser, lambda: browser.find_element("tag name", "body").get_attribute("data-ready") == "true"
          or _error_text(browser))  # fmt: skip


def _wait(browser, condition, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda _: condition())


def _error_text(browser) -> str:
    if not browser.find_element("id", "error").is_displayed():
        return ""
    return browser.find_element("id", "error-text").text


def _data_url(path: Path) -> str:
    """What the page's FileReader sends for the file: the browser's MIME type for the extension, base64 bytes."""
    mime = {".png": "image/png", ".jpg": "image/jpeg"}[path.suffix]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _screenshot(browser, name: str) -> None:
    if os.environ.get("VLKIT_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / f"serve-{name}.png"))


def _image(folder: Path) -> Path:
    return sorted(folder.glob("*.png"))[0]


def test_chat_page_streams_the_answer_the_api_gives(browser, neva_run, vqa_dir, tmp_path):
    image = _image(vqa_dir / "images" / "val")
    with _serve(neva_run, tmp_path / "serve.log") as url:
        _open(browser, url)
        assert browser.find_element("id", "chat-view").is_displayed()
        # Sampled with a seed: greedy answers of a 3-step model are empty (its first token is the end of text). A
        # trained run (VLKIT_SERVE_RUNS, for the docs' screenshot) answers greedily, as `vlkit chat` does.
        settings = {"max_tokens": 16, "temperature": 0 if os.environ.get("VLKIT_SERVE_RUNS") else 1, "seed": 0}
        browser.find_element("css selector", ".settings summary").click()
        for name, value in settings.items():
            browser.find_element("id", name.replace("_", "-")).clear()
            browser.find_element("id", name.replace("_", "-")).send_keys(str(value))
        request = {"model": _api(url, "/v1/models")[1]["data"][0]["id"], **settings}

        def ask(text: str, with_image: bool) -> str:
            if with_image:
                browser.find_element("id", "chat-image").send_keys(str(image))
                _wait(browser, lambda: browser.find_element("id", "chat-preview").get_attribute("src"))
            browser.find_element("id", "chat-input").send_keys(text)
            browser.find_element("id", "chat-send").click()
            # app.js marks an answer done when its stream has ended
            answers = browser.find_elements("css selector", ".msg.assistant")
            _wait(browser, lambda: answers[-1].get_attribute("data-done") == "true")
            assert not _error_text(browser)
            return browser.execute_script("return arguments[0].querySelector('.text').textContent", answers[-1])

        first = ask("What colour is the shape?", with_image=True)
        second = ask("And what shape is it?", with_image=False)
        # The page keeps the conversation: its streamed answers equal the API's plain answers to the same messages.
        question = [{"type": "text", "text": "What colour is the shape?"},
                    {"type": "image_url", "image_url": {"url": _data_url(image)}}]  # fmt: skip
        messages = [{"role": "user", "content": question}]
        expected = _api(url, "/v1/chat/completions", {**request, "messages": messages})
        assert first and first == expected[1]["choices"][0]["message"]["content"]
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And what shape is it?"}]
        expected = _api(url, "/v1/chat/completions", {**request, "messages": messages})
        assert second and second == expected[1]["choices"][0]["message"]["content"]
        _screenshot(browser, "chat")

        browser.find_element("id", "new-chat").click()
        assert browser.find_elements("css selector", "#chat-log li") == []


def test_search_page_shows_thumbnails_with_scores(browser, clip_run, shapes_dir, vqa_dir, tmp_path):
    from vlkit.cli import main

    index = tmp_path / "index"
    assert main(["embed", "--model", str(clip_run), "--shards", str(shapes_dir / "train"), "--out", str(index),
                 "--quiet"]) == 0  # fmt: skip
    image = _image(vqa_dir / "images" / "val")
    with _serve(clip_run, tmp_path / "serve.log", "--index", str(index)) as url:
        _open(browser, url)
        assert browser.find_element("id", "search-view").is_displayed()
        browser.find_element("id", "search-image").send_keys(str(image))

        def thumbnails_loaded() -> bool:
            images = browser.find_elements("css selector", "#search-results img")
            loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
            return bool(images) and all(browser.execute_script(loaded, img) for img in images)

        _wait(browser, thumbnails_loaded)
        assert not _error_text(browser)
        hits = _api(url, "/v1/search", {"image": _data_url(image), "top_k": 12})[1]["data"]
        shown = [e.text for e in browser.find_elements("css selector", "#search-results .score")]
        assert shown == [f"#{h['rank']} · {h['score']:.3f}" for h in hits]
        captions = [e.text for e in browser.find_elements("css selector", "#search-results .caption")]
        assert captions[0] == hits[0]["caption"] and all(captions)
        _screenshot(browser, "search")

        # A text query replaces the image results.
        browser.find_element("id", "search-query").send_keys("a red circle")
        browser.find_element("css selector", "#search-form button").click()
        hits = _api(url, "/v1/search", {"query": "a red circle", "top_k": 12})[1]["data"]
        _wait(browser, lambda: [e.text for e in browser.find_elements("css selector", "#search-results .caption")]
              == [h["caption"] for h in hits])  # fmt: skip


def test_clip_page_without_index_classifies_with_own_labels(browser, clip_run, vqa_dir, tmp_path):
    image = _image(vqa_dir / "images" / "val")
    labels = ["a red circle", "a blue square", "a green triangle"]
    with _serve(clip_run, tmp_path / "serve.log") as url:
        _open(browser, url)
        assert browser.find_element("id", "zeroshot-view").is_displayed()
        browser.find_element("id", "zs-labels").send_keys(", ".join(labels))
        browser.find_element("id", "zs-image").send_keys(str(image))
        _wait(browser, lambda: len(browser.find_elements("css selector", "#zs-results li")) == 3)
        assert not _error_text(browser)
        shown = [e.text for e in browser.find_elements("css selector", "#zs-results .bar-label")]
        assert sorted(shown) == sorted(labels)
        _screenshot(browser, "zeroshot")


def test_classifier_page_asks_for_the_api_key_and_shows_top5_and_api_errors(browser, classifier_run, vqa_dir, tmp_path):
    image = _image(vqa_dir / "images" / "val")
    with _serve(classifier_run, tmp_path / "serve.log", "--api-key", "sesame") as url:
        # Without the key the server's 401 is shown; with it (kept in localStorage) the page loads.
        browser.get(url + "/")
        _wait_ready(browser)
        assert _error_text(browser).endswith("(HTTP 401)")
        browser.find_element("id", "api-key").send_keys("sesame")
        browser.find_element("css selector", "#key-form button").click()
        _wait_ready(browser)
        assert not _error_text(browser)
        assert browser.execute_script("return localStorage.getItem('vlkit.apiKey')") == "sesame"
        assert browser.find_element("id", "classify-view").is_displayed()

        browser.find_element("id", "cls-image").send_keys(str(image))
        _wait(browser, lambda: len(browser.find_elements("css selector", "#cls-results li")) == 5)
        assert not _error_text(browser)
        top5 = _api(url, "/v1/classify", {"image": _data_url(image), "top_k": 5}, key="sesame")[1]["data"]
        shown = [e.text for e in browser.find_elements("css selector", "#cls-results .bar-label")]
        assert shown == [c["label"] for c in top5]
        percents = [e.text for e in browser.find_elements("css selector", "#cls-results .bar-score")]
        assert percents == [f"{c['score'] * 100:.1f}%" for c in top5]
        _screenshot(browser, "classify")

        # The server's error (an undecodable image) reaches the user in the page.
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"not an image")
        browser.find_element("id", "cls-image").send_keys(str(bad))
        _wait(browser, lambda: _error_text(browser))
        status, answer = _api(url, "/v1/classify", {"image": _data_url(bad), "top_k": 5}, key="sesame")
        assert 400 <= status < 500
        assert _error_text(browser) == f"{answer['error']['message']} (HTTP {status})"

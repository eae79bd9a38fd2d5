"""The page at ``/`` in a real browser (Debian's chromium, headless, driven by selenium)
against ``specsplit serve --target smollm2-135m``: the text streams in, every token is
marked by how it came, the request's statistics and the server panel fill in.

Needs the apt packages ``chromium`` and ``chromium-driver``; skipped without them. Set
SPECSPLIT_PAGE_SCREENSHOT=path to also save a screenshot there (docs/page.png is made so).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request

import pytest

from conftest import specsplit_serve

webdriver = pytest.importorskip("selenium.webdriver")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (shutil.which("chromium") and shutil.which("chromedriver")),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver)",
    ),
]

MODEL = "smollm2-135m"
PROMPT = (
    "apple, banana, cherry, date, elderberry, fig, grape.\n"
    "apple, banana, cherry, date, elderberry, fig, grape.\n"
    "apple,"
)


@pytest.fixture(scope="module")
def url(smollm2_converted):
    with specsplit_serve("--target", MODEL, "--target-backend", "torch", "--threads", "2") as u:
        yield u


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait(cond, seconds: float, what: str):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def fill(driver, element_id: str, value: str) -> None:
    driver.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];",
        element_id,
        value,
    )


def tokens(driver) -> list[tuple[str, str]]:
    """(text, origin) of every token span in the output."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#output .tok')]"
        ".map(el => [el.textContent, el.dataset.origin]);"
    )


def test_the_page_streams_tokens_marked_by_origin(url, browser):
    browser.get(url + "/")
    by_id = browser.find_element
    wait(lambda: by_id("id", "model").text == MODEL, 20, "the model name")
    fill(browser, "mode", "completion")
    fill(browser, "prompt", PROMPT)
    fill(browser, "max_tokens", "48")
    fill(browser, "temperature", "0")
    by_id("id", "go").click()

    # the text streams: tokens appear while the request is still running, then more
    wait(lambda: len(tokens(browser)) > 0, 60, "the first tokens")
    seen_while_streaming = len(tokens(browser))
    state = browser.execute_script("return document.body.dataset.state")
    wait(
        lambda: browser.execute_script("return document.body.dataset.state") == "idle",
        120,
        "the end",
    )
    spans = tokens(browser)
    assert state == "streaming" and 0 < seen_while_streaming < len(spans)
    assert by_id("id", "error").get_attribute("hidden") is not None

    # each token carries its origin; several kinds here (the list repeats: the n-gram
    # drafter's tokens are accepted, rounds end with a bonus or the target's own token)
    origins = {o for _, o in spans}
    assert origins <= {"accepted:ngram", "correction", "bonus", "target"}
    kinds = {o.split(":")[0] for o in origins}
    assert "accepted" in kinds and len(kinds) >= 2, origins
    classes = browser.execute_script(
        "return [...document.querySelectorAll('#output .tok')].map(el => el.className);"
    )
    assert all(c.startswith("tok o-") for c in classes)

    # the text is the API's text (greedy), and the statistics are the request's
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 48, "temperature": 0}
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        api = json.loads(r.read())
    assert "".join(t for t, _ in spans) == api["choices"][0]["text"]
    assert by_id("id", "s_finish").text == "length"
    assert by_id("id", "s_tokens").text == "48"
    assert float(by_id("id", "s_tau").text) >= 1.0
    assert by_id("id", "s_acc").text.endswith("%")

    # the server panel (GET /status, polled every second)
    wait(lambda: by_id("id", "p_passes").text not in ("–", "0"), 10, "the server panel")
    wait(lambda: by_id("id", "p_sessions").text.startswith("0 / "), 10, "the session closed")
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#p_drafters tbody tr')].map(r => r.cells[0].textContent);"
    )
    assert rows == ["ngram"]
    assert len(browser.find_elements("css selector", "#p_batches .bar")) == 8  # --max-batch

    shot = os.environ.get("SPECSPLIT_PAGE_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)


def test_the_page_shows_an_error_from_the_api(url, browser):
    browser.get(url + "/")
    wait(lambda: browser.find_element("id", "model").text == MODEL, 20, "the model name")
    fill(browser, "temperature", "-1")
    browser.find_element("id", "go").click()
    error = browser.find_element("id", "error")
    wait(lambda: error.get_attribute("hidden") is None, 20, "the error")
    assert error.text.startswith("400:") and "temperature" in error.text

"""The playground page in real headless Chromium (Debian's chromium and chromedriver, driven by Selenium),
against a live `tinylm serve`: it loads with every host but the server's unresolvable and fetches nothing
from anywhere else, a generation streams into it, pasted text gets a token per span whose surprisal is
`tinylm score`'s, the attention heatmap draws, and a screenshot of it all is saved (playground.png in this
test's tmp folder: look at it after a change to the page).

`make test` installs chromium and chromium-driver first (`make browser`); without them this test is
skipped, except in CI (CI=true), where a missing browser is a failure.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from conftest import run_cmd
from serve_helpers import TINYLM, Server, make_work
from tinylm.generation.sampling import Sample, decode
from tinylm.model import load_model
from tinylm.tokenizer.bpe import load_tokenizer

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PROMPT = "Once upon a time"
TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
        "dog, Max. One day, Max found a big red ball under a tree.")


@pytest.fixture(scope="module")
def work(tmp_path_factory, shared_dir) -> Path:
    return make_work(tmp_path_factory.mktemp("playground") / "work", shared_dir)


@pytest.fixture(scope="module")
def server(work):
    server = Server(["--model", str(work / "data/model")], cwd=work, log_dir=work.parent)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(server):
    if not (CHROMIUM and CHROMEDRIVER):
        # The README's test command (`make test`) installs them first, so their absence is a broken setup.
        pytest.fail("Debian's chromium and chromium-driver are not installed (`make browser` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1700", "--no-first-run", "--disable-background-networking",
                     # Offline: no name resolves but the server's address, so an external resource cannot load.
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, server):
    browser.get(server.url + "/")
    wait_for(browser, "return document.querySelectorAll('#tokens .tok').length > 0")  # the sample text is scored
    return browser


def wait_for(driver, condition: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(condition))


def requested_urls(driver) -> list[str]:
    """Every URL the page asked the network for since the last call (Chrome's DevTools log)."""
    events = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    return [event["params"]["request"]["url"] for event in events if event["method"] == "Network.requestWillBeSent"]


def test_the_page_loads_offline_from_the_server_alone(page, server):
    urls = requested_urls(page)
    assert f"{server.url}/" in urls and f"{server.url}/v1/models" in urls
    assert [url for url in urls if not url.startswith(server.url + "/")] == []
    assert page.find_element("id", "status").text == "1 model: tinylm"


def set_value(driver, element_id: str, value) -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input'));", element_id, str(value))


def test_a_generation_streams_into_the_page(page, work):
    tokenizer = load_tokenizer(work / "data/tokenizer")
    generation, = decode(load_model(work / "data/model/model.pt"), [tokenizer.eot_id, *tokenizer.encode(PROMPT)],
                         Sample(temperature=0.8), 80, tokenizer.eot_id, [4])
    for element_id, value in (("prompt", PROMPT), ("temperature", 0.8), ("max_tokens", 80), ("seed", 4)):
        set_value(page, element_id, value)
    page.find_element("id", "generate-button").click()
    wait_for(page, "const box = document.getElementById('output-0'); return box && box.dataset.done === 'true'")
    box = page.find_element("id", "output-0")
    assert box.find_element("css selector", ".completion").get_property("textContent") == \
        tokenizer.decode(generation.tokens)
    assert int(box.get_attribute("data-chunks")) > 2  # it came as a stream of chunks, not in one piece
    assert "finish: " in box.find_element("css selector", ".label").text


def test_pasted_text_gets_tinylm_scores_surprisal_per_token(page, work):
    (work / "text.txt").write_text(TEXT, encoding="utf-8")
    printed = run_cmd([str(TINYLM), "score", "--per-token", "--top", "0", "--model", str(work / "data/model"),
                       "text.txt"], work)
    summary, table = printed.split("\n\nevery token:\n")
    rows = [line.split() for line in table.splitlines()[1:]]
    set_value(page, "text", TEXT)
    page.find_element("id", "score-button").click()
    wait_for(page, f"return document.getElementById('summary').textContent === {json.dumps(summary.strip())}")
    spans = page.execute_script("return [...document.querySelectorAll('#tokens .tok')].map("
                                "s => [Number(s.dataset.nll), s.textContent, getComputedStyle(s).backgroundColor])")
    assert len(spans) == len(rows)
    for (nll, _, _), row in zip(spans, rows):
        assert f"{nll:.3f}" == row[2]  # the loss column of `tinylm score --per-token`, in nats
    assert "".join(text for _, text, _ in spans) == TEXT
    colours = {colour for nll, _, colour in spans}
    assert len(colours) > 5  # coloured by surprisal, not one flat colour

    # Hover the most surprising token: its probability and the model's alternatives.
    worst = max(range(len(spans)), key=lambda i: spans[i][0])
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(page).move_to_element(page.find_elements("css selector", "#tokens .tok")[worst]).perform()
    tooltip = page.find_element("id", "tooltip")
    assert tooltip.is_displayed() and f"loss {spans[worst][0]:.3f} nats" in tooltip.text
    assert "the model expected:" in tooltip.text and len(tooltip.find_elements("css selector", "tr")) == 5


def test_attention_heatmap_of_any_layer_and_head_and_a_screenshot(page, tmp_path):
    from selenium.webdriver.support.ui import Select

    Select(page.find_element("id", "layer")).select_by_value("1")
    Select(page.find_element("id", "head")).select_by_value("1")
    wait_for(page, "const c = document.getElementById('heatmap'); return c.dataset.layer === '1' && c.dataset.head === '1'")
    size = int(page.find_element("id", "heatmap").get_attribute("data-size"))
    assert size == len(page.find_elements("css selector", "#tokens .tok")) + 1  # <|endoftext|>, then the text
    # The heatmap holds ink (attention weights), not just the white background.
    painted = page.execute_script("const c = document.getElementById('heatmap');"
                                  "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                                  "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 200) n++; return n")
    assert painted > size  # at least the diagonal's worth of cells
    assert re.search(r"\d+ tokens, layer 1, head 1", page.find_element("id", "attention-info").text)
    page.execute_script("window.scrollTo(0, 0)")
    screenshot = tmp_path / "playground.png"
    assert page.save_screenshot(str(screenshot))  # the window: 1280 x 1700, the whole page
    data = screenshot.read_bytes()
    width, height = struct.unpack(">II", data[16:24])  # the PNG's IHDR
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and width >= 1200 and height >= 1000

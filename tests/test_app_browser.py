"""The web chat in a real headless Chromium (Debian's chromium and chromium-driver, as
`make browser` installs them), driven by Selenium: a question asked on the page streams
its answer, the cited passages and the stats line appear, a follow-up carries the
conversation, Reset forgets it. Saves docs/web_chat.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from app_fixtures import STORE_QUESTION, build_store

from ragdec.decoding.methods import GenerationParams
from ragdec.pipelines.rag import RagPipeline, RagSettings

CHROMIUM = os.environ.get("RAGDEC_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RAGDEC_CHROMEDRIVER", "/usr/bin/chromedriver")
# the committed picture of the page; refreshed when RAGDEC_UPDATE_SCREENSHOT=1 (a test run
# otherwise leaves the work tree as it was)
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "web_chat.png"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: run `make browser` (apt-get install -y chromium chromium-driver) "
                    "or point RAGDEC_CHROMIUM / RAGDEC_CHROMEDRIVER at them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1100,860"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2, minilm):
    from ragdec.app.server import BackgroundServer, create_app
    from ragdec.retrieval.retriever import Retriever

    with Retriever.open(build_store(tmp_path_factory.mktemp("web"), minilm), minilm) as store:
        pipeline = RagPipeline(smollm2, store, settings=RagSettings(k=2))
        app = create_app(pipeline, MODEL, retriever=store, defaults=GenerationParams(max_new_tokens=24, method="auto"))
        with BackgroundServer(app) as running:
            yield running


def ask_on_page(driver, question: str, turns: int):
    """Type ``question``, send it, wait for its answer's stats line; return the turn."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "question")
    box.send_keys(question)
    driver.find_element(By.ID, "ask").click()
    wait = WebDriverWait(driver, 180)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn .turn-stats")) == turns)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    return driver.find_elements(By.CSS_SELECTOR, ".turn")[-1]


def test_web_chat_streams_answers_with_sources_and_stats(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    assert MODEL in browser.find_element(By.ID, "where").text

    turn = ask_on_page(browser, STORE_QUESTION, turns=1)
    answer = turn.find_element(By.CLASS_NAME, "answer")
    assert answer.text.strip() and not turn.find_elements(By.CLASS_NAME, "error")
    assert int(answer.get_attribute("data-pieces")) > 1  # it came as a stream of events, not at once
    sources = turn.find_elements(By.CSS_SELECTOR, ".sources li")
    assert sources and any("Nikola Tesla" in s.text for s in sources)
    stats = browser.find_element(By.ID, "stats").text
    for figure in ("tokens/s", "tokens/forward", "copied", "cache off"):
        assert figure in stats, stats

    follow = ask_on_page(browser, "When did he die?", turns=2)
    assert follow.find_element(By.CLASS_NAME, "answer").text.strip()
    assert browser.execute_script("return conversation.length") == 4  # both turns go with the next question
    picture = SCREENSHOT if os.environ.get("RAGDEC_UPDATE_SCREENSHOT") == "1" else tmp_path / "web_chat.png"
    picture.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(picture))

    browser.find_element(By.ID, "reset").click()
    assert browser.execute_script("return conversation.length") == 0
    assert not browser.find_elements(By.CSS_SELECTOR, ".turn")
    assert "forgotten" in browser.find_element(By.ID, "stats").text

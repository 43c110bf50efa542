"""The comparison page in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium) uploads an image, asks a question of the base model and four prefixes, reads the answers and
latencies back, then captions the image. The server binds 127.0.0.1; the browser only talks to it."""

import re
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import serve_tiny
from mmprefix.serving import PrefixService
from mmprefix.serving.server import create_app

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # .ci/run installs both


@pytest.fixture()
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def boxes(driver):
    return {box.get_attribute("value"): box for box in driver.find_elements(By.CSS_SELECTOR, "#models input")}


def compare(driver):
    driver.find_element(By.ID, "compare").click()
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result") and all(
        "done" in card.get_attribute("class") for card in d.find_elements(By.CSS_SELECTOR, ".result")))
    return {card.get_attribute("data-model"): (card.find_element(By.CSS_SELECTOR, ".answer").text,
                                               card.find_element(By.CSS_SELECTOR, ".latency").text)
            for card in driver.find_elements(By.CSS_SELECTOR, ".result")}


def test_the_page_compares_the_base_model_and_four_prefixes_side_by_side(browser, tmp_path):
    serve_tiny.save_prefixes(tmp_path)
    for name in ("violet", "amber"):  # five question-answering prefixes, to try the limit of four
        shutil.copytree(tmp_path / "red", tmp_path / name)
    service = PrefixService(serve_tiny.blip_engines(), tmp_path, window=0.2)
    picture = tmp_path / "upload.png"
    serve_tiny.image(4).save(picture)
    with serve_tiny.ThreadServer(create_app(service)) as server:
        browser.get(f"http://127.0.0.1:{server.port}/")
        WebDriverWait(browser, 30).until(lambda d: len(boxes(d)) == 7)
        browser.find_element(By.ID, "image").send_keys(str(picture))
        browser.find_element(By.ID, "question").send_keys(serve_tiny.QUESTIONS[0])
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "compare").is_enabled())
        found = boxes(browser)
        assert found["base"].is_selected() and not found["cap"].is_enabled(), "a captioning prefix cannot answer"
        for name in ("red", "green", "blue", "violet"):
            found[name].click()
        assert not found["amber"].is_enabled(), "at most four prefixes"

        shown = compare(browser)
        assert sorted(shown) == ["base", "blue", "green", "red", "violet"]
        for model, (answer, latency) in shown.items():
            assert answer == serve_tiny.expected_answer(tmp_path, None if model == "base" else model, 4)
            assert re.fullmatch(r"\d+ ms \(server \d+ ms\)", latency), latency
        assert len({answer for answer, _ in shown.values()}) > 2

        browser.find_element(By.ID, "question").clear()
        browser.find_element(By.ID, "question").send_keys(" ")  # an empty question: caption the image
        found = boxes(browser)
        assert found["cap"].is_enabled() and not found["red"].is_selected()
        found["cap"].click()
        shown = compare(browser)
        assert sorted(shown) == ["base", "cap"]
        for model, (caption, _) in shown.items():
            assert caption == serve_tiny.expected_answer(tmp_path, None if model == "base" else model, 4, question=None)

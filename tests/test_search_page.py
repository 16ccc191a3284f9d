"""The search page in a real browser: Debian's chromium, headless, driven by selenium through the
system chromedriver (nothing downloads a browser or a driver). Skipped where chromium is not
installed; a failure when CI is set (.ci/run installs it)."""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.cli import main as cli
from pipeline.core.config import params_from_dict
from pipeline.search.query import Searcher
from pipeline.search.serve import make_server
from tiny_project import make_search_project, project_params

CHROMIUM = os.environ.get("TBPS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TBPS_CHROMEDRIVER", "/usr/bin/chromedriver")
QUERY = "a woman in a red shirt with a black backpack"


def _require_browser() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not (Path(path).is_file() and os.access(path, os.X_OK))]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing, and CI is set: .ci/run installs chromium and chromium-driver")
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def server(prepared, tmp_path_factory):
    root = make_search_project(tmp_path_factory.mktemp("page") / "project", prepared)
    searcher = Searcher.for_variant(params_from_dict(project_params()), "baseline", root)
    httpd = make_server(searcher, 10, "127.0.0.1", 0)  # a free loopback port
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _results(driver, timeout: float = 30.0) -> list[tuple[str, str]]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.ID, "status").get_attribute("data-done")
                                         or d.find_element(By.ID, "error").text)
    return [(f.get_attribute("data-rank"), f.get_attribute("data-key")) for f in driver.find_elements(By.CSS_SELECTOR, "figure.hit")]


def test_the_page_shows_the_cli_s_images_in_the_cli_s_order(server, browser, monkeypatch, capsys, tmp_path):
    from selenium.webdriver.common.by import By

    root, url = server
    browser.get(url + "/")
    assert "index" in browser.find_element(By.ID, "index").text and "12 images" in browser.find_element(By.ID, "index").text
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys(QUERY)
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("5")
    browser.find_element(By.ID, "go").click()
    shown = _results(browser)
    monkeypatch.chdir(root)
    assert cli(["search", QUERY, "--variant", "baseline", "-k", "5", "--json"]) == 0
    expected = [(str(r["rank"]), r["key"]) for r in json.loads(capsys.readouterr().out)["results"]]
    assert shown == expected and len(shown) == 5
    # every image on the page loaded (served from the shards) and is a real picture
    sizes = browser.execute_script("return [...document.querySelectorAll('figure.hit img')]"
                                   ".map(i => i.complete ? i.naturalWidth : 0)")
    assert all(width > 0 for width in sizes), sizes
    if os.environ.get("TBPS_SEARCH_SCREENSHOT"):
        browser.save_screenshot(os.environ["TBPS_SEARCH_SCREENSHOT"])


def test_a_link_with_a_query_answers_on_opening_and_bad_input_shows_the_error(server, browser):
    from selenium.webdriver.common.by import By

    _, url = server
    browser.get(url + "/?q=" + urllib.request.quote(QUERY) + "&k=3")
    assert [rank for rank, _ in _results(browser)] == ["1", "2", "3"]
    browser.get(url + "/?q=%20&k=3")  # blank: the page submits it, the server refuses it
    _results(browser)
    assert "the query is empty" in browser.find_element(By.ID, "error").text
    assert browser.find_elements(By.CSS_SELECTOR, "figure.hit") == []


def test_the_api_answers_bad_k_with_400(server):
    _, url = server
    for query, message in (("q=a+man&k=0", "k is 0"), ("q=a+man&k=99", "the gallery has 12 images"), ("q=a&k=x", "whole number")):
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"{url}/api/search?{query}", timeout=10)
        assert raised.value.code == 400 and message in json.loads(raised.value.read())["error"]


def test_the_page_loads_nothing_from_outside(server):
    _, url = server
    page = urllib.request.urlopen(url + "/", timeout=10).read().decode()
    assert "http://" not in page and "https://" not in page and "//cdn" not in page

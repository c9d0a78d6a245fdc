"""The web page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``.ci/run`` installs) driven by Selenium uploads a sample clip and
shows the labels /v1/classify gives, the heat map and the index's nearest clips."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from cavmae.runtime.serve import ServeConfig, create_app  # noqa: E402
from conftest import AUDIOSET_CLIP  # noqa: E402
from serve_support import ServerThread, open_service, tiny_model, upload  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture()
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_uploads_a_clip_and_shows_what_the_api_says(browser, tmp_path, tmp_path_factory):
    model = tiny_model(tmp_path_factory.getbasetemp())
    app = create_app(open_service(model), ServeConfig(tmp_dir=tmp_path))
    with ServerThread(app) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 60).until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(AUDIOSET_CLIP))
        WebDriverWait(browser, 180).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-done")
            or "error" in d.find_element(By.ID, "status").get_attribute("class"))
        assert browser.find_element(By.ID, "status").text == f"done: {AUDIOSET_CLIP.name}"
        shown = [(li.find_element(By.CLASS_NAME, "name").text, float(li.get_attribute("data-score")))
                 for li in browser.find_elements(By.CSS_SELECTOR, "#labels li.label")]
        api = httpx.post(url + "/v1/classify", files=upload(AUDIOSET_CLIP), data={"top_k": 5}, timeout=120).json()
        assert shown == [(t["label"], t["score"]) for t in api["top"]]
        heat = browser.find_element(By.ID, "heat-image")
        assert heat.get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return arguments[0].naturalWidth", heat) == 224
        hits = browser.find_elements(By.CSS_SELECTOR, "#hits tr.hit")
        assert hits and AUDIOSET_CLIP.name in hits[0].text
        time.sleep(0.2)  # let the last paint land before the screenshot
        shot = tmp_path / "serve-page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        keep = os.environ.get("CAVMAE_TEST_SCREENSHOT")  # where a person wants to look at it
        if keep:
            shutil.copy(shot, keep)

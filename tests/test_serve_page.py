"""The page of detrkit serve in a real browser: headless Chromium from Debian's packages, driven
through its own chromedriver (Selenium). Outside CI the test skips when no browser is installed;
with CI=true it must run (.ci/run installs chromium and chromium-driver).

The screenshot goes to the test's temporary folder; set DETRKIT_SCREENSHOT=docs/images/serve-page.png
to write the picture shown in docs/serving.md.
"""
import json
import math
import os
from pathlib import Path

import pytest

from detrkit import serve
from serve_helpers import assert_same_detections, call, make_checkpoint, predict, running, write_images

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Offline-safe flags: no sandbox (root in CI), no GPU, no background fetches, a fresh profile.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,860"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        from selenium import webdriver  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing and IN_CI:
        pytest.fail(f"CI=true but {', '.join(missing)} missing: .ci/run installs the browser, make test the package")
    if missing:
        pytest.skip(f"no browser to drive: {', '.join(missing)} missing (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)  # no driver download
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    detector = serve.Detector(make_checkpoint(folder / "tiny"), device="cpu")
    with running(detector) as url:
        yield url, write_images(folder / "images")


def shown_detections(driver) -> list[dict]:
    """What the page draws: one SVG group per box, its detection in data attributes."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#boxes g.det')].map((g) => ({
            label: Number(g.dataset.label), name: g.dataset.name, score: Number(g.dataset.score),
            box: JSON.parse(g.dataset.box)}));""")


def requests_served(url) -> int:
    return json.loads(call(url, "/health")[1])["requests"]


def test_page_draws_the_api_detections_and_filters_them_without_a_request(browser, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, images = served
    image = images[0]
    default = serve.ServeConfig.threshold
    want = predict(url, image.read_bytes(), threshold=default)["detections"]
    browser.get(url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "detr_r18_tiny" in d.find_element(By.ID, "model").text)  # GET /model answered
    assert float(browser.find_element(By.ID, "threshold").get_attribute("value")) == default

    browser.find_element(By.ID, "file").send_keys(str(image))  # what picking a file does
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#boxes g.det"))
    shown = shown_detections(browser)
    assert len(shown) >= 3
    assert_same_detections(shown, want, score_tol=1e-6, box_tol=1e-4)
    assert_same_detections(json.loads(browser.find_element(By.ID, "json").text)["detections"], want,
                           score_tol=1e-6, box_tol=1e-4)  # the JSON shown is what is drawn

    # Drawn over the picture: the best box's corner lies where the image scale puts it.
    place = browser.execute_script("""
        const img = document.getElementById('image').getBoundingClientRect();
        const box = document.querySelector('#boxes g.det rect.box').getBoundingClientRect();
        return {img: [img.left, img.top, img.width, img.height], box: [box.left, box.top, box.width, box.height]};""")
    (ix, iy, iw, ih), (bx, by, bw, bh) = place["img"], place["box"]
    x0, y0, x1, y1 = want[0]["box"]
    scale = iw / 128
    assert iw > 0 and math.isclose(ih / 96, scale, rel_tol=0.02)
    assert abs(bx - (ix + x0 * scale)) < 2 and abs(by - (iy + y0 * scale)) < 2
    assert abs(bw - (x1 - x0) * scale) < 3 and abs(bh - (y1 - y0) * scale) < 3

    # The slider, moved with the keyboard as a user would, above the median score: fewer boxes.
    before = requests_served(url)
    median = sorted(d["score"] for d in shown)[len(shown) // 2]
    browser.find_element(By.ID, "threshold").send_keys(Keys.ARROW_RIGHT * math.ceil((median - default) / 0.01 + 1))
    threshold = float(browser.find_element(By.ID, "threshold").get_attribute("value"))
    assert threshold > median
    fewer = shown_detections(browser)
    assert 0 < len(fewer) < len(shown)
    assert requests_served(url) == before  # filtered in the page, no new request
    assert_same_detections(fewer, predict(url, image.read_bytes(), threshold=threshold)["detections"],
                           score_tol=1e-6, box_tol=1e-4)
    assert f"{threshold:.2f}" in browser.find_element(By.ID, "status").text

    shot = Path(os.environ.get("DETRKIT_SCREENSHOT") or tmp_path / "serve-page.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_shows_the_error_of_a_refused_upload(browser, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = served
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    browser.get(url + "/")
    browser.find_element(By.ID, "file").send_keys(str(text))
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 60).until(lambda d: "error" in status.get_attribute("class"))
    assert "notes.jpg: not an image" in status.text and not shown_detections(browser)

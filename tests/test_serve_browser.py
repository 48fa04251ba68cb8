"""`groundkit serve` in a real browser: headless Debian chromium driven by selenium (chromedriver from
Debian's chromium-driver) against a real server process on 127.0.0.1.

Skipped only when chromium or chromedriver is not installed (`make test` installs them as root).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import serve_helpers as sh

pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")


def _which(*names: str) -> str | None:
    for n in names:
        p = shutil.which(n) or (f"/usr/bin/{n}" if Path(f"/usr/bin/{n}").is_file() else None)
        if p:
            return p
    return None


CHROMIUM = _which("chromium", "chromium-browser")
CHROMEDRIVER = _which("chromedriver") or (
    "/usr/lib/chromium/chromedriver" if Path("/usr/lib/chromium/chromedriver").is_file() else None
)
MISSING = "the browser tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"


@pytest.fixture(scope="module", autouse=True)
def _need_a_browser():
    """Skip without chromium/chromedriver, except in CI (CI=true), which must run these tests."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(MISSING + "; CI must run them (`make test` installs them as root)")
        pytest.skip(MISSING)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    _, crosskd = sh.crosskd_run(tmp_path_factory.getbasetemp())
    salient = sh.make_salient_run(tmp_path_factory.mktemp("serve_browser") / "salient")
    with sh.serve_process(["--run", str(salient), "--run", f"tv={crosskd}"]) as (url, proc):
        yield url, proc, crosskd


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,1300"):
        opts.add_argument(a)
    opts.add_argument("--no-proxy-server")  # loopback only
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, css: str, timeout: float = 30.0):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))


def test_upload_a_photo_and_see_the_box(server, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    url, proc, _ = server
    photo = sh.china_jpg()
    with Image.open(photo) as img:
        expected, _ = sh.salient_box(img, sh.SalientNet().channel_weights.detach().numpy())
    browser.get(url + "/?run=salient")
    assert browser.title == "groundkit \u2014 salient"
    browser.find_element(By.ID, "image").send_keys(str(photo))
    browser.find_element(By.ID, "text").send_keys("the temple roof")
    browser.find_element(By.ID, "submit").click()
    img = _wait(browser, "#result-image")
    # the drawn image loaded: a decoded PNG of the photo's display size
    loaded = browser.execute_script(
        "const i = arguments[0]; return [i.complete, i.naturalWidth, i.naturalHeight];",
        img,
    )
    assert loaded == [True, 640, 427]
    rows = browser.find_elements(By.CSS_SELECTOR, "#boxes tbody tr")
    assert len(rows) == 1 and "the temple roof" in rows[0].text
    shown = [float(rows[0].find_element(By.CLASS_NAME, c).text) for c in ("x1", "y1", "x2", "y2")]
    assert shown == pytest.approx(expected, abs=0.05)
    assert browser.find_element(By.ID, "text").get_attribute("value") == "the temple roof"
    shot = tmp_path / "serve_ground.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}")


def test_a_bad_file_shows_the_message(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, proc, _ = server
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"this is a text file with a .jpg name\n" * 40)
    browser.get(url + "/?run=salient")
    browser.find_element(By.ID, "image").send_keys(str(bad))
    browser.find_element(By.ID, "text").send_keys("the beach")
    browser.find_element(By.ID, "submit").click()
    err = _wait(browser, "#error")
    assert err.text == "the file is not an image (its content is none of: JPEG, PNG, WebP, BMP, GIF)"
    assert not browser.find_elements(By.ID, "result-image")
    assert browser.find_element(By.ID, "ground-form")  # the form is there to try again
    shot = tmp_path / "serve_bad_file.png"
    assert browser.save_screenshot(str(shot))
    # an oversized file is stopped in the page before it is sent
    big = tmp_path / "big.png"
    big.write_bytes(bytes(9 * 1024 * 1024))
    browser.get(url + "/?run=salient")
    browser.find_element(By.ID, "image").send_keys(str(big))
    browser.find_element(By.ID, "text").send_keys("x")
    browser.find_element(By.ID, "submit").click()
    msg = browser.find_element(By.ID, "client-error")
    assert msg.is_displayed() and msg.text == "The file is 9.0 MB; the limit is 8.0 MB."
    assert proc.poll() is None


def test_choose_the_retrieval_run_and_search(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from groundkit.methods import get_method

    url, proc, crosskd = server
    expected = [v for v, _ in get_method("crosskd").predictor(crosskd).search("a brown dog is jumping", k=5)]
    browser.get(url + "/")
    Select(browser.find_element(By.ID, "run")).select_by_value("tv")  # the page follows the choice
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "search-form"))
    assert not browser.find_elements(By.ID, "ground-form")
    browser.find_element(By.ID, "text").send_keys("a brown dog is jumping")
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("5")
    browser.find_element(By.ID, "submit").click()
    _wait(browser, "#videos li")
    ids = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#videos .vid")]
    assert ids == expected
    assert "no frames on disk" in browser.find_element(By.ID, "no-frames").text

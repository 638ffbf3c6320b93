"""The page (isekai web) in a real browser: Debian's headless chromium driven by Selenium, against the page's
app and a real tritonserver on the small checkpoints.

Skips with a reason where chromium or its driver is missing (scripts/install-test-deps installs both).
Screenshots go to .cache/tests/web/; page.png there is the README's (client/web/screenshot.png is a copy of
one).
"""

from __future__ import annotations

import io
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isekai.client.web.cli import PageServer
from isekai.serving.server import free_port
from tests.conftest import ASTRONAUT_CLICK, CACHE

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SHOTS = CACHE / "web"
TIMEOUT_S = 120

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("chromium and chromium-driver are not installed (scripts/install-test-deps installs them)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def page(server):
    with PageServer(server.grpc_url, port=free_port()) as running:
        yield running


def open_browser(downloads: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500",
                "--disable-gpu", "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture
def browser(tmp_path):
    driver = open_browser(tmp_path / "downloads")
    driver.downloads = tmp_path / "downloads"
    yield driver
    driver.quit()


def wait(driver, condition, timeout_s: float = TIMEOUT_S, what: str = ""):
    return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def load(driver, page) -> None:
    driver.get(page.url)
    wait(driver, lambda d: len(Select(d.find_element(By.ID, "character")).options) > 0, what="no characters")


def upload(driver, path: Path) -> None:
    driver.find_element(By.ID, "file-input").send_keys(str(path))


def photo_shown(driver) -> str:
    return wait(driver, lambda d: d.find_element(By.ID, "photo-canvas").get_attribute("data-photo"),
                what="the photo was not shown")


def masks(driver) -> int:
    return int(driver.find_element(By.ID, "photo-canvas").get_attribute("data-masks") or 0)


def click_photo(driver, x: float, y: float, right: bool = False) -> None:
    """Click the photo at (x, y) in the photo's own pixels, wherever and however large the canvas is drawn."""
    canvas = driver.find_element(By.ID, "photo-canvas")
    width, height = (int(canvas.get_attribute(a)) for a in ("width", "height"))
    shown = canvas.rect
    dx = x * shown["width"] / width - shown["width"] / 2
    dy = y * shown["height"] / height - shown["height"] / 2
    actions = ActionChains(driver).move_to_element_with_offset(canvas, int(dx), int(dy))
    (actions.context_click() if right else actions.click()).perform()


def error_text(driver) -> str:
    box = driver.find_element(By.ID, "error")
    return "" if box.get_attribute("hidden") is not None else box.text


def generate(driver) -> None:
    steps = driver.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("2")
    driver.find_element(By.ID, "generate").click()


def result_size(driver) -> tuple[int, int]:
    return tuple(wait(driver, lambda d: d.execute_script(
        "const i = document.getElementById('result-img');"
        "return !document.getElementById('result-panel').hidden && i.complete && i.naturalWidth"
        " ? [i.naturalWidth, i.naturalHeight] : null;"), what="no result image"))


def test_upload_click_pick_generate_download(page, browser, astronaut_png, tmp_path):
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(astronaut_png)
    load(browser, page)
    upload(browser, photo)
    assert photo_shown(browser) == "astronaut.png 512x512"

    click_photo(browser, *ASTRONAUT_CLICK)
    status = browser.find_element(By.ID, "segment-status")
    assert "Preparing the photo" in status.text or masks(browser) == 1, "the first click must say it prepares"
    wait(browser, lambda d: masks(d) == 1, what="no mask after the first click")
    first = browser.find_element(By.ID, "photo-canvas").get_attribute("data-mask-hash")
    assert status.text.startswith("Mask:"), status.text
    shot(browser, "1-first-click")

    click_photo(browser, 60, 60, right=True)  # right click: not the person
    wait(browser, lambda d: masks(d) == 2, what="no mask after the negative click")
    assert browser.find_element(By.ID, "photo-canvas").get_attribute("data-mask-hash") != first
    shot(browser, "2-negative-click")

    # Start again with the one click (the small random SAM's mask after the negative click may be too thin to
    # keep).
    browser.find_element(By.ID, "clear").click()
    click_photo(browser, *ASTRONAUT_CLICK)
    wait(browser, lambda d: masks(d) == 3, what="no mask after clearing and clicking again")
    assert browser.find_element(By.ID, "photo-canvas").get_attribute("data-mask-hash") == first

    characters = Select(browser.find_element(By.ID, "character"))
    names = [o.get_attribute("value") for o in characters.options]
    assert "default" in names and "lora-demo" in names
    characters.select_by_value("lora-demo")
    assert "lora" in browser.find_element(By.ID, "character-prompt").text

    generate(browser)
    assert result_size(browser) == (512, 512)
    history = browser.find_element(By.ID, "stage").get_attribute("data-history").split()
    fractions = [float(item.rsplit(":", 1)[1]) for item in history]
    stages = {item.rsplit(":", 1)[0] for item in history}
    assert {"queued", "diffusion", "compose", "done"} <= stages, history
    assert fractions == sorted(fractions) and len({f for f in fractions if 0 < f < 1}) >= 3, history
    assert not error_text(browser)
    assert browser.find_element(By.ID, "preview").is_displayed(), "no preview of the character"
    session = browser.execute_script("return state.session")
    with urllib.request.urlopen(f"{page.url}api/s/{session}/result.png") as response:
        result = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    assert np.abs(result.astype(int) - np.asarray(Image.open(photo).convert("RGB"))).mean() > 1.0
    path = shot(browser, "3-result")
    readme_shot(path)

    browser.find_element(By.ID, "download").click()
    downloaded = wait(browser, lambda d: [p for p in d.downloads.glob("*.png")], what="no download")
    data = downloaded[0].read_bytes()
    assert downloaded[0].name == "astronaut.isekai.png"
    assert Image.open(io.BytesIO(data)).size == (512, 512)


def readme_shot(path: Path) -> None:
    """A small copy for the README: the whole page, half size, 128 colours."""
    image = Image.open(path).convert("RGB")
    image = image.resize((image.width // 2, image.height // 2), Image.LANCZOS)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(SHOTS / "page.png", optimize=True)


def test_bad_uploads_show_a_message(page, browser, tmp_path):
    load(browser, page)
    text = tmp_path / "notes.png"
    text.write_text("this is not a photo")
    upload(browser, text)
    wait(browser, error_text, what="no message for a file that is not an image")
    assert "not a photo" in error_text(browser) and "Traceback" not in error_text(browser)
    big = tmp_path / "huge.jpg"
    with open(big, "wb") as f:
        f.truncate(40 * 2**20)
    upload(browser, big)
    wait(browser, lambda d: "too big" in error_text(d), what="no message for a file over the limit")
    shot(browser, "4-bad-upload")


def test_server_down_is_a_message(browser):
    with PageServer(f"127.0.0.1:{free_port()}", port=free_port()) as nowhere:  # no Triton listens there
        browser.get(nowhere.url)
        wait(browser, lambda d: "cannot be reached" in error_text(d), what="no message: the server is down")
        assert "Traceback" not in error_text(browser)


def test_two_visitors_keep_their_own_photos_and_results(page, astronaut_png, tmp_path):
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(astronaut_png)
    first, second = open_browser(tmp_path / "a"), open_browser(tmp_path / "b")
    try:
        load(first, page)
        load(second, page)
        upload(first, photo)
        second.find_element(By.CSS_SELECTOR, "[data-sample=chelsea]").click()
        assert photo_shown(first) == "astronaut.png 512x512"
        assert photo_shown(second) == "chelsea 451x300"
        click_photo(first, *ASTRONAUT_CLICK)
        click_photo(second, 150, 150)
        for driver in (first, second):
            wait(driver, lambda d: masks(d) == 1, what="no mask")
        generate(first)
        generate(second)
        assert result_size(first) == (512, 512)
        assert result_size(second) == (451, 300)
        shot(second, "5-second-visitor")
        # Each page's photo is still its own on the server.
        for driver, size in ((first, (512, 512)), (second, (451, 300))):
            session = driver.execute_script("return state.session")
            with urllib.request.urlopen(f"{page.url}api/s/{session}/photo.png") as response:
                assert Image.open(io.BytesIO(response.read())).size == size
    finally:
        first.quit()
        second.quit()

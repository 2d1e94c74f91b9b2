"""The service's web page in a real headless Chromium (Debian's `chromium` driven by its
`chromedriver` through Selenium): upload a real record, wait for the neighbours, check what the
page shows against the API's own answer, pick a stored record, and save a screenshot.

`.ci/run` installs the browser when it is missing; without one this test skips and says why.
Set ECGPLAT_SCREENSHOTS=DIR to keep the screenshots (default: the test's tmp folder)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is missing: pip install -e '.[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency")
import httpx  # noqa: E402
from serve_world import REPO, LiveServer  # noqa: E402

RECORD = REPO / "data" / "samples" / "cinc2021" / "georgia" / "E07500"  # a real PhysioNet record
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,2200",
)


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(
            "no Chromium here: `apt-get install -y chromium chromium-driver` "
            "(.ci/run installs them when missing)"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="ecgplat-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page_server(serve_world):
    from ecgplat.cli.serve.app import create_app
    from ecgplat.cli.serve.settings import ServeSettings

    conf = ServeSettings(
        store=serve_world["store"],
        index=serve_world["index"],
        checkpoint=serve_world["dx"],
        reload_interval=3600,
    )
    with LiveServer(create_app(conf)) as live:
        yield live


def _wait(browser, script: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(lambda b: b.execute_script(script))


def _shown(browser) -> list[tuple[str, str, int]]:
    """(key, score text, number of drawn leads) of each neighbour card, in page order."""
    from selenium.webdriver.common.by import By

    out = []
    for card in browser.find_elements(By.CSS_SELECTOR, "#matches .match"):
        score = card.find_element(By.CSS_SELECTOR, ".score").text.split()[1]
        leads = len(card.find_elements(By.CSS_SELECTOR, "polyline.lead"))
        out.append((card.find_element(By.CSS_SELECTOR, ".key").text, score, leads))
    return out


def test_page_upload_and_pick(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_server.url + "/")
    _wait(browser, "return document.body.dataset.ready === 'true'")
    files = [RECORD.with_suffix(".hea"), RECORD.with_suffix(".mat")]
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in files))
    browser.find_element(By.ID, "upload-button").click()
    _wait(browser, "return document.getElementById('neighbours').dataset.ready === 'true'")
    _wait(browser, "return document.querySelectorAll('#prediction-table tbody tr').length > 0")

    api = httpx.post(
        f"{page_server.url}/query",
        files=[("files", (p.name, p.read_bytes())) for p in files],
        data={"k": "8"},
    ).json()
    shown = _shown(browser)
    assert [key for key, _, _ in shown] == [m["key"] for m in api["matches"]]
    assert [score for _, score, _ in shown] == [f"{m['score']:.3f}" for m in api["matches"]]
    assert all(leads == 12 for _, _, leads in shown)  # each neighbour's trace, side by side
    query_leads = browser.find_elements(By.CSS_SELECTOR, "#query-trace polyline.lead")
    assert len(query_leads) == 12
    status = browser.find_element(By.ID, "status").text
    assert (
        status == f"Found {len(api['matches'])} similar ECGs among {api['index']['rows']} stored."
    )

    predicted = httpx.post(
        f"{page_server.url}/predict", files=[("files", (p.name, p.read_bytes())) for p in files]
    ).json()
    rows = browser.find_elements(By.CSS_SELECTOR, "#prediction-table tbody tr")
    task, row = predicted["task"], predicted["prediction"]
    top = max(task["classes"], key=lambda c: row[f"p_{c}"])
    top_name = task["names"][task["classes"].index(top)]
    assert rows[0].get_attribute("data-finding") == top_name
    shown_pct = rows[0].find_element(By.CSS_SELECTOR, ".value").text
    assert shown_pct == f"{100 * row[f'p_{top}']:.1f}%"
    if httpx.get(f"{page_server.url}/health").json()["explain"]:
        _wait(browser, "return document.getElementById('query-trace').dataset.explained")
        assert browser.find_elements(By.CSS_SELECTOR, "#query-trace rect.attribution")

    out = Path(os.environ.get("ECGPLAT_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(out / "serve_page_upload.png"))
    assert (out / "serve_page_upload.png").stat().st_size > 20_000

    # pick a stored record instead: the page shows the API's neighbours of it
    key = api["matches"][1]["key"]
    pick = browser.find_element(By.ID, "pick")
    pick.clear()
    pick.send_keys(key)
    browser.find_element(By.ID, "pick-button").click()
    _wait(browser, "return document.getElementById('neighbours').dataset.ready === 'true'")
    by_key = httpx.post(f"{page_server.url}/query", data={"key": key, "k": "8"}).json()
    assert [k for k, _, _ in _shown(browser)] == [m["key"] for m in by_key["matches"]]
    assert key in browser.find_element(By.ID, "query-info").text

"""A headless Chromium driven by selenium against real ``whisperctl serve`` processes.

Debian's ``chromium`` and ``chromium-driver`` packages provide the browser and its driver (.ci/run
installs them); without them these tests skip. A failing test leaves a screenshot, the page's
HTML and the browser's console under ``.cache/screenshots/``, and the report names them.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

from tests.fixtures.server import Server, running_server
from tests.web.page import Page

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

#: The fast mode's batches are a minute of audio instead of four, so the job's progress moves
#: (and a test sees it move) mid-job even in a server that has not measured its speed yet.
SERVER_ENV = {"WHISPER_BATCH_SIZE": "2"}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    driver = getattr(item, "funcargs", {}).get("browser")
    if report.failed and report.when in ("setup", "call") and isinstance(driver, WebDriver):
        report.sections.append(("browser artefacts", _save_artefacts(driver, item)))
    return report


def _save_artefacts(driver: WebDriver, item: pytest.Item) -> str:
    folder = item.config.rootpath / ".cache" / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    stem = str(folder / re.sub(r"[^\w-]+", "_", item.nodeid))
    try:
        driver.save_screenshot(f"{stem}.png")
        Path(f"{stem}.html").write_text(driver.page_source)
        console = "\n".join(f"{e['level']} {e['message']}" for e in driver.get_log("browser"))
    except WebDriverException as exc:  # the browser itself may be what failed
        return f"could not save the page: {exc.msg}"
    return f"{stem}.png\n{stem}.html\nbrowser console:\n{console or '(empty)'}"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """A fresh headless Chromium (its own profile, so its own session storage); downloads land
    in ``tmp_path / "downloads"``."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",  # containers have a tiny /dev/shm
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(tmp_path / "downloads"),
            "download.prompt_for_download": False,
        },
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps Selenium Manager from trying to download one (CI is offline).
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module's tests; each test mints its own code, so they share nothing."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    with running_server(tmp_path_factory.mktemp("web") / "data", env=SERVER_ENV) as server:
        yield server


@pytest.fixture
def page(browser: WebDriver, web_server: Server) -> Page:
    return Page(browser, web_server.base_url)

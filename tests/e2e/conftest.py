"""Headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium) against a real service.

Without a browser on the machine these tests skip, except under CI (CI=true), where they fail: a missing
install step must not pass unnoticed.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.integration.conftest import Service, start_service, stop_service

CHROMIUM = os.environ.get("PRUNEKIT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PRUNEKIT_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000", "--lang=en-US")


def _missing_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{path} is missing (apt-get install -y chromium chromium-driver)"
    return None


@pytest.fixture(scope="session")
def browser_available() -> None:
    reason = _missing_browser()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def dashboard_service(browser_available: None, tmp_path_factory: pytest.TempPathFactory,
                      models_root: Path) -> Iterator[Service]:
    """`prunekit serve` + `prunekit worker` on the embedded stack (SQLite, SQLite broker, local folder)."""
    svc = start_service({"QUEUE_NAME": f"prunekit-e2e-{secrets.token_hex(4)}"}, tmp_path_factory.mktemp("e2e"),
                        models_root)
    try:
        yield svc
    finally:
        stop_service(svc)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(browser_available: None, tmp_path_factory: pytest.TempPathFactory, downloads: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never looks for (or downloads) one.
    browser = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(20)
    browser.set_script_timeout(10)
    (ARTIFACTS / "dashboard-failure.png").unlink(missing_ok=True)  # from an earlier run
    try:
        yield browser
    finally:
        browser.quit()


def screenshot(driver: Any, name: str, full_page: bool = False) -> Path:
    """Saves tests/artifacts/dashboard-NAME.png (the whole page when full_page)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    size = driver.get_window_size()
    if full_page:
        driver.execute_script("window.scrollTo(0, 0)")
        height, chrome = driver.execute_script(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]")
        driver.set_window_size(size["width"], min(max(int(height) + int(chrome), 600), 4000))
    try:
        driver.save_screenshot(str(path))
    finally:
        if full_page:
            driver.set_window_size(size["width"], size["height"])
    return path


def publish_docs_screenshot(path: Path, name: str = "dashboard.png") -> None:
    """With UPDATE_DOCS_SCREENSHOT=1, copies a screenshot to docs/NAME (the README's pictures); never
    otherwise, so that a test run leaves the work tree clean."""
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(path, ROOT / "docs" / name)

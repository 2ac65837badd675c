"""A headless Chromium driven by Selenium, for the dashboard's tests.

Debian's chromium and chromium-driver (.ci/run installs both): Selenium is pointed at /usr/bin/chromium and
/usr/bin/chromedriver (found on PATH) and never downloads a browser. Without them a test is skipped, and
fails under CI=true (tests/binaries.py).
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from binaries import require
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[webdriver.Chrome]:
    """A headless Chromium of `width` x `height` CSS pixels, quit on exit."""
    options = webdriver.ChromeOptions()
    options.binary_location = require("chromium")
    # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations are console errors
    driver = webdriver.Chrome(options=options, service=Service(executable_path=require("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: webdriver.Chrome, condition: Callable[[webdriver.Chrome], Any], timeout: float,
             what: str) -> Any:
    """Poll `condition(driver)` until it is truthy (its value is returned); fail after `timeout` seconds
    naming `what`. A DOM redrawn under the check counts as not yet."""
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(condition, message=f"{what} did not hold within {timeout:g}s")


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """The browser console's SEVERE entries since the last call (a blocked script or style, a JS error)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def full_page_screenshot(driver: webdriver.Chrome) -> bytes:
    """A PNG of the whole page, beyond the window's height (Chromium's DevTools capture)."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    return base64.b64decode(shot["data"])

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
from selenium.webdriver.common.by import By
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


def click(driver: webdriver.Chrome, selector: str, timeout: float = 10.0) -> None:
    """Click the element `selector` finds, as a user would; again if the page redrew it meanwhile."""
    def clicked(d: webdriver.Chrome) -> bool:
        d.find_element(By.CSS_SELECTOR, selector).click()
        return True

    wait_for(driver, clicked, timeout, f"a click on {selector}")


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """The browser console's SEVERE entries since the last call (a blocked script or style, a JS error)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def full_page_screenshot(driver: webdriver.Chrome) -> bytes:
    """A PNG of the whole page, beyond the window's height (Chromium's DevTools capture)."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    return base64.b64decode(shot["data"])


# What the dashboard shows, read in one script run: the page redraws every refresh, so elements found by
# one call may be gone at the next (a stale element), while this is one consistent look.
_DASHBOARD_STATE = """
const all = (s) => [...document.querySelectorAll(s)];
return {
  nodes: Object.fromEntries(all('#topology g.node[data-kind=service]').map(
    (n) => [n.dataset.service, {health: n.dataset.health, class: n.getAttribute('class')}])),
  edges: all('#topology g.edge[data-from]').map((e) => [e.dataset.from, e.dataset.to, e.getAttribute('class')]),
  routes: Object.fromEntries(all('#routes tr[data-route]').map(
    (r) => [`${r.dataset.service} ${r.dataset.route} ${r.dataset.side}`,
            r.querySelector('td.success').dataset.successRate])),
  breakers: Object.fromEntries(all('#upstreams tr[data-caller]').map(
    (r) => [`${r.dataset.caller} ${r.dataset.upstream}`, r.dataset.breaker])),
  failed_bars: all('.trace rect.bar.failed').length,
  plotted: all('#plots .plot-group[data-service] polyline').length,
  success_plotted: all('#plots .plot-group[data-service] polyline.s-success').length,
  refreshes: Number(document.getElementById('refresh').dataset.refreshes),
};
"""


def dashboard_state(driver: webdriver.Chrome) -> dict[str, Any]:
    """{"nodes": {service: {"health", "class"}}, "edges": [[from, to, class]], "routes": {"SERVICE ROUTE SIDE":
    success rate text}, "breakers": {"CALLER UPSTREAM": state}, "failed_bars", "plotted" (lines),
    "success_plotted" (success-rate lines: a step of history with calls), "refreshes"}."""
    return dict(driver.execute_script(_DASHBOARD_STATE))

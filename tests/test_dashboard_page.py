"""The dashboard page in a real headless Chromium against a FAKE of the observer's API (canned documents,
tests/fakes/observer_api.py), and its files as the observer serves them. The end-to-end test against a
real `meshctl up` is tests/test_dashboard.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from binaries import needs
from browser import chromium, click, console_errors, dashboard_state, wait_for
from fakes.observer_api import FakeObserverApi, failed_trace
from selenium import webdriver
from selenium.webdriver.common.by import By

from aivo_mesh.telemetry.admin import HttpError, Request
from aivo_mesh.telemetry.dashboard import ASSETS, CONTENT_SECURITY_POLICY, dashboard_asset, same_origin_json

# The fake answers at once and says `interval_seconds: 1`: a refresh is due every second. Bounds are
# generous (a loaded 2-core machine), never slept.
REFRESH_BOUND = 10.0


def test_every_asset_is_served_with_the_security_headers() -> None:
    for path, (_, content_type) in ASSETS.items():
        answer = dashboard_asset("GET", path)
        assert answer is not None and answer.status == 200 and answer.body, path
        assert answer.content_type == content_type
        assert answer.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert answer.headers["X-Frame-Options"] == "DENY"
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY and "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    page = dashboard_asset("GET", "/")
    assert page is not None and b'<script src="dashboard.js"' in page.body
    assert b"<script>" not in page.body and b" style=" not in page.body  # nothing inline for the CSP to block


def test_only_the_dashboards_own_files_are_answered() -> None:
    for path in ("/api/v1/mesh", "/../pyproject.toml", "/dashboard_static/index.html", "/dashboard.py",
                 "/%2e%2e/admin.py", "/certs"):
        assert dashboard_asset("GET", path) is None, path
    refused = dashboard_asset("POST", "/")
    assert refused is not None and refused.status == 405 and refused.headers["Allow"] == "GET"


def _post(**headers: str) -> Request:
    return Request("POST", "/api/v1/breakers/reset", {}, {k.replace("_", "-"): v for k, v in headers.items()},
                   b'{"service": "learner-svc", "upstream": "auth-svc"}')


def test_a_reset_is_taken_only_as_json_from_the_observers_own_origin() -> None:
    json = "application/json"
    same_origin_json(_post(host="127.0.0.1:8899", origin="http://127.0.0.1:8899", content_type=json),
                     "127.0.0.1", 8899)
    same_origin_json(_post(host="localhost:8899", content_type=f"{json}; charset=utf-8"), "127.0.0.1", 8899)
    refused = {  # what a page of another site can make a browser send, and the status it gets
        "a form's body": (_post(host="127.0.0.1:8899", content_type="text/plain"), 415),
        "another origin": (_post(host="127.0.0.1:8899", origin="http://evil.example", content_type=json), 403),
        "a rebound DNS name": (_post(host="evil.example:8899", origin="http://evil.example:8899",
                                     content_type=json), 421),
        "another port": (_post(host="127.0.0.1:8900", content_type=json), 421),
    }
    for what, (request, status) in refused.items():
        with pytest.raises(HttpError) as refusal:
            same_origin_json(request, "127.0.0.1", 8899)
        assert refusal.value.status == status, what


@pytest.fixture
def page() -> Iterator[tuple[webdriver.Chrome, FakeObserverApi]]:
    with FakeObserverApi() as api, chromium() as driver:
        driver.get(api.url)
        wait_for(driver, lambda d: d.find_element(By.ID, "refresh").get_attribute("data-refreshes") != "0",
                 REFRESH_BOUND, "the first refresh")
        yield driver, api


@needs("chromium", "chromedriver")
def test_the_page_draws_the_documents_and_breaks_no_csp_rule(page) -> None:
    driver, api = page
    shown = dashboard_state(driver)
    assert sorted(shown["nodes"]) == sorted(s["name"] for s in api.mesh["services"])
    assert {(f, t) for f, t, _ in shown["edges"]} == {(e["from"], e["to"]) for e in api.mesh["edges"]}
    assert "5.00 rps · 100 %" in driver.find_element(By.ID, "topology").text
    assert "a FAKE observer" in driver.find_element(By.ID, "source").text  # the data source is stated
    nack = driver.find_element(By.CSS_SELECTOR, '#control-plane tr[data-node="spiffe://aivo.local/learner-svc"]')
    assert "route timeout: expected a duration" in nack.text
    wait_for(driver, lambda d: dashboard_state(d)["plotted"], REFRESH_BOUND, "the history plots")
    wait_for(driver, lambda d: dashboard_state(d)["failed_bars"], REFRESH_BOUND, "the failed trace")
    assert console_errors(driver) == []


@needs("chromium", "chromedriver")
def test_a_failing_edge_and_a_down_service_turn_red(page) -> None:
    driver, api = page
    api.mesh["services"][0]["health"] = "unreachable"
    api.mesh["edges"][-1]["golden"]["success_rate"] = 0.5
    wait_for(driver, lambda d: "bad" in dashboard_state(d)["nodes"]["auth-svc"]["class"], REFRESH_BOUND,
             "auth-svc drawn red")
    edges = {(f, t): c for f, t, c in dashboard_state(driver)["edges"]}
    assert "bad" in edges["analytics-svc", "event-collector-svc"] and "ok" in edges["learner-svc", "auth-svc"]
    api.down = True
    wait_for(driver, lambda d: "error" in (d.find_element(By.ID, "refresh").get_attribute("class") or ""),
             REFRESH_BOUND, "the observer's failure shown")
    assert "503" in driver.find_element(By.ID, "refresh").text


@needs("chromium", "chromedriver")
def test_reset_asks_first_and_posts_the_caller_and_upstream(page) -> None:
    driver, api = page
    click(driver, 'button.reset[data-caller="learner-svc"]')
    dialog = driver.find_element(By.ID, "reset-dialog")
    assert dialog.is_displayed() and "learner-svc towards auth-svc" in dialog.text
    driver.find_element(By.ID, "reset-cancel").click()
    assert not dialog.is_displayed() and api.resets == []  # cancelled: nothing sent
    click(driver, 'button.reset[data-caller="learner-svc"]')
    driver.find_element(By.ID, "reset-confirm").click()
    wait_for(driver, lambda d: "breaker now closed" in d.find_element(By.ID, "reset-result").text,
             REFRESH_BOUND, "the reset's answer shown")
    assert api.resets == [{"service": "learner-svc", "upstream": "auth-svc"}]


@needs("chromium", "chromedriver")
def test_a_trace_link_selects_that_trace_even_when_it_is_not_recent(page) -> None:
    driver, api = page
    old = failed_trace("cd" * 16)
    api.traces.append(old)  # in the log, but not among the five recent failures the page lists
    api.traces[:0] = [failed_trace(f"{i:032x}") for i in range(10)]
    driver.get(api.url + "#trace=" + "cd" * 16)
    card = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".trace.selected"), REFRESH_BOUND,
                    "the linked trace selected")[0]
    assert card.get_attribute("data-trace-id") == "cd" * 16
    failed_bars = card.find_elements(By.CSS_SELECTOR, "rect.bar.failed")
    assert len(failed_bars) == 2

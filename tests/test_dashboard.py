"""The dashboard end to end: a real `meshctl up` (proxyless, four services, real mTLS) with traffic, its real
observer serving the page, and a real headless Chromium reading it. The page tests against canned documents
are tests/test_dashboard_page.py.

One route fails on purpose: auth-svc aborts learner-svc's ValidateToken calls (a fault block, UNKNOWN), so
that route's success rate drops and learner-svc's MeshClient opens its breaker towards auth-svc (which
waits minutes before probing, so only the reset closes it).

Set DASHBOARD_SCREENSHOTS=DIR to keep PNGs of the page (docs/dashboard.png is one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import yaml
from binaries import needs
from browser import chromium, click, console_errors, dashboard_state, full_page_screenshot, wait_for
from helpers import meshctl
from selenium import webdriver
from selenium.webdriver.common.by import By

from aivo_mesh.runtime.state import RuntimeInfo, StateDir
from aivo_mesh.telemetry.dashboard import CONTENT_SECURITY_POLICY

if TYPE_CHECKING:
    from aivo_mesh.client import MeshClient

pytestmark = [pytest.mark.slow, needs("chromium", "chromedriver")]
ROOT = Path(__file__).resolve().parents[1]
SERVICES = ["analytics-svc", "auth-svc", "event-collector-svc", "learner-svc"]
VALIDATE = "/aivo.auth.v1.AuthService/ValidateToken"
# The observer samples every 2 s and the page asks every 2 s; a change shows after at most one of each,
# plus an admin read's timeout (1.5 s) for a process that hangs. The bound is that with room for a
# loaded 2-core machine: what is bounded is the page's refresh, whose timing is the behaviour under test.
REFRESH_BOUND = 15.0


def failing_mesh(path: Path) -> Path:
    """The repository's mesh.yaml with learner-svc's ValidateToken calls aborted, and auth-svc's breaker
    opening after 3 failed calls and then waiting minutes before a probe."""
    doc = yaml.safe_load((ROOT / "mesh.yaml").read_text())
    auth = next(s for s in doc["services"] if s["name"] == "auth-svc")
    auth["circuit_breaker"] = {"consecutive_failures": 3, "first_probe": "5m", "recovery_time": "10m"}
    route = next(r for r in auth["routes"] if r["match"] == VALIDATE)
    route["fault"] = {"abort_status": "UNKNOWN", "abort_percent": 100, "callers": ["learner-svc"]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def one_round(client: MeshClient, learner: str) -> int:
    """The demo flow's calls (runtime/driver.py), each made whatever the previous one answered (the demo's
    flow stops at its first failure, and learner-svc's would stop it before analytics-svc is reached);
    returns how many failed."""
    from aivo_mesh.runtime.driver import DEMO_PASSWORD
    from aivo_mesh.services.protos import (
        analytics_pb2,
        analytics_pb2_grpc,
        auth_pb2,
        auth_pb2_grpc,
        events_pb2,
        events_pb2_grpc,
        learner_pb2,
        learner_pb2_grpc,
    )

    token = ""
    failed = 0
    with contextlib.suppress(grpc.aio.AioRpcError):
        token = (await auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc")).Authenticate(
            auth_pb2.AuthenticateRequest(learner_id=learner, password=DEMO_PASSWORD))).token
    calls: list[Awaitable[Any]] = [
        learner_pb2_grpc.LearnerServiceStub(await client.get_channel("learner-svc")).GetProfile(
            learner_pb2.GetProfileRequest(learner_id=learner), metadata=(("authorization", f"Bearer {token}"),)),
        events_pb2_grpc.EventCollectorServiceStub(await client.get_channel("event-collector-svc")).Collect(
            events_pb2.CollectRequest(event=events_pb2.Event(learner_id=learner, event_type="lesson_completed",
                                                             payload_json="{}", occurred_at=1),
                                      idempotency_key=str(uuid.uuid4()))),
        analytics_pb2_grpc.AnalyticsServiceStub(await client.get_channel("analytics-svc")).RunReport(
            analytics_pb2.RunReportRequest(report="events_by_type")),
    ]
    for call in calls:
        try:
            await call
        except grpc.aio.AioRpcError:
            failed += 1
    return failed


class Traffic:
    """`one_round` after `one_round` from a mesh-client MeshClient, on its own event loop thread, until
    `stop()`."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.flows = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        from aivo_mesh.client import MeshClient, MeshConfig
        from aivo_mesh.config import load_mesh
        from aivo_mesh.runtime.mesh import mesh_for_clients

        info = RuntimeInfo.read(self.state)
        assert info is not None
        view = mesh_for_clients(load_mesh(self.state.mesh_file), info)
        async with MeshClient(MeshConfig.for_identity("mesh-client", self.state.certs, view)) as client:
            while not self._stop.is_set():
                await one_round(client, f"learner-{self.flows % 20}")
                self.flows += 1

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def running_mesh(tmp_path: Path) -> Iterator[tuple[StateDir, str]]:
    """`meshctl up` on the proxyless plane from failing_mesh; yields the state dir and the dashboard URL
    `up` printed. `meshctl down` on exit."""
    state = StateDir(tmp_path / "mesh")
    up = meshctl("up", "--plane", "proxyless", "--state-dir", str(state.root), "--free-ports", "--timeout", "90",
                 "--config", str(failing_mesh(tmp_path / "mesh.yaml")))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        printed = [line.split("dashboard: ", 1)[1].strip() for line in up.stdout.splitlines()
                   if line.startswith("dashboard: ")]
        info = RuntimeInfo.read(state)
        assert info is not None and info.observer is not None
        assert printed == [f"http://{info.observer}/"] and info.observer.startswith("127.0.0.1:")
        told = meshctl("dashboard", "--state-dir", str(state.root))
        assert told.returncode == 0 and told.stdout.strip() == printed[0], told.stdout + told.stderr
        yield state, printed[0]
    finally:
        down = meshctl("down", "--state-dir", str(state.root))
        assert down.returncode == 0, down.stdout + down.stderr


def test_dashboard_without_a_mesh_exits_2(tmp_path: Path) -> None:
    out = meshctl("dashboard", "--state-dir", str(tmp_path / "none"))
    assert out.returncode == 2 and "no mesh runs" in out.stderr and "meshctl up" in out.stderr
    assert out.stdout == ""


def _shoot(driver: webdriver.Chrome, name: str) -> None:
    where = os.environ.get("DASHBOARD_SCREENSHOTS")
    if where:
        (Path(where) / name).write_bytes(full_page_screenshot(driver))


def test_the_dashboard_follows_a_real_mesh(running_mesh: tuple[StateDir, str]) -> None:
    state, url = running_mesh
    # The observer serves the page with its policy, and takes no reset a form could send.
    with urllib.request.urlopen(url, timeout=10) as page:
        assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    form = urllib.request.Request(url + "api/v1/breakers/reset", method="POST", headers={
        "Content-Type": "text/plain"}, data=b'{"service": "learner-svc", "upstream": "auth-svc"}')
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(form, timeout=10)
    assert refused.value.code == 415
    stopped: int | None = None
    with Traffic(state) as traffic, chromium() as driver:
        try:
            driver.get(url)
            # The topology: four services and the calls between them (learner-svc validates tokens with
            # auth-svc; analytics-svc reads event-collector-svc). The observer samples the services' own
            # metrics: the test's client is a caller it does not see.
            expected = {("learner-svc", "auth-svc"), ("analytics-svc", "event-collector-svc")}
            def with_edges(d: webdriver.Chrome) -> dict[str, Any] | None:
                shown = dashboard_state(d)
                return shown if expected <= {(f, t) for f, t, _ in shown["edges"]} else None

            shown = wait_for(driver, with_edges, REFRESH_BOUND, f"the edges {sorted(expected)}")
            assert sorted(shown["nodes"]) == SERVICES
            assert {n["health"] for n in shown["nodes"].values()} == {"healthy"}

            # The failing route: its success rate drops, its edge turns red, learner-svc's breaker opens.
            route = f"auth-svc {VALIDATE} server"
            wait_for(driver, lambda d: float(dashboard_state(d)["routes"].get(route) or 1) < 0.5, REFRESH_BOUND,
                     "ValidateToken's success rate below 50 %")
            wait_for(driver, lambda d: any(f == "learner-svc" and t == "auth-svc" and "bad" in c
                                           for f, t, c in dashboard_state(d)["edges"]),
                     REFRESH_BOUND, "learner-svc -> auth-svc drawn red")
            breaker = "learner-svc auth-svc"
            wait_for(driver, lambda d: dashboard_state(d)["breakers"].get(breaker) == "open", REFRESH_BOUND,
                     "learner-svc's breaker towards auth-svc shown open")
            wait_for(driver, lambda d: dashboard_state(d)["failed_bars"] > 0, REFRESH_BOUND,
                     "a failed trace's waterfall")
            # History: a point is a step of 5 s or more that holds calls; the plots refresh every 5 s.
            wait_for(driver, lambda d: dashboard_state(d)["success_plotted"] > 0, 2 * REFRESH_BOUND,
                     "success rates plotted from the history")
            assert traffic.flows > 0
            _shoot(driver, "dashboard.png")

            # Reset, behind the confirmation. The traffic stops first: a closed breaker meeting the fault
            # again would open again, and the test would race the flow.
            traffic.stop()
            click(driver, 'button.reset[data-caller="learner-svc"][data-upstream="auth-svc"]')
            dialog = driver.find_element(By.ID, "reset-dialog")
            assert dialog.is_displayed() and "learner-svc towards auth-svc" in dialog.text
            driver.find_element(By.ID, "reset-confirm").click()
            wait_for(driver, lambda d: "breaker now closed" in d.find_element(By.ID, "reset-result").text,
                     REFRESH_BOUND, "the reset's answer")
            wait_for(driver, lambda d: dashboard_state(d)["breakers"].get(breaker) == "closed", REFRESH_BOUND,
                     "the breaker shown closed")

            # A service that stops answering (SIGSTOP: the supervisor sees no exit to restart) turns red.
            victim = next(r for r in state.read_processes() if r.name == "event-collector-svc")
            os.kill(victim.pid, signal.SIGSTOP)
            stopped = victim.pid
            def collector_red(d: webdriver.Chrome) -> dict[str, Any] | None:
                node: dict[str, Any] = dashboard_state(d)["nodes"]["event-collector-svc"]
                return node if "bad" in node["class"] else None

            down = wait_for(driver, collector_red, REFRESH_BOUND, "the stopped event-collector-svc drawn red")
            assert down["health"] in ("unreachable", "unhealthy")
            _shoot(driver, "dashboard-service-down.png")
            assert [e for e in console_errors(driver) if "Content Security Policy" in e] == []
        finally:
            if stopped is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped, signal.SIGCONT)  # `meshctl down` must be able to stop it

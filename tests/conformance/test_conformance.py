"""Every conformance scenario (src/aivo_mesh/conformance/scenarios.yaml) on every plane: one mesh.yaml, one
behaviour. The harness is the package's (`meshctl conformance` runs the same); this file runs each scenario as
a test, prints its table of planes, and checks that docs/planes.md carries the suite's summary and that
`meshctl lint` warns of each documented divergence. `make conformance` runs only this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from binaries import needs
from helpers import meshctl

from aivo_mesh.config.loader import parse_mesh
from aivo_mesh.conformance.planes import CALLED, mesh_doc
from aivo_mesh.conformance.run import run_scenario
from aivo_mesh.conformance.scenario import PLANES, Scenario, docs_with_table, load, markdown_table
from aivo_mesh.lint.envoy import lint_mesh
from aivo_mesh.pki import CertLayout

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = load()


def base_mesh() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "mesh.yaml").read_text()))


@needs("envoy")
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario_behaves_the_same_on_every_plane(scenario: Scenario, mesh_certs: CertLayout, tmp_path: Path):
    run = await run_scenario(scenario, base_mesh(), mesh_certs, tmp_path)
    print(run.table())
    assert run.passed, run.table()


def test_docs_planes_md_carries_the_suites_table() -> None:
    docs = ROOT / "docs" / "planes.md"
    text = docs.read_text()
    wanted = docs_with_table(text, markdown_table(SCENARIOS, tuple(PLANES)))
    assert text == wanted, ("docs/planes.md's conformance table is stale: "
                            "run `meshctl conformance --docs docs/planes.md`")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_meshctl_lint_warns_of_each_documented_divergence_and_of_nothing_else(scenario: Scenario) -> None:
    """A user whose mesh.yaml asks for what a plane cannot do hears it from `meshctl lint`, before any call."""
    doc = mesh_doc(scenario, base_mesh())
    if scenario.versions:  # the instances' endpoints, as the planes write them
        auth = next(s for s in doc["services"] if s["name"] == CALLED)
        auth["endpoints"] = [{"address": f"127.0.0.1:{20000 + i}", "version": v}
                             for i, v in enumerate(scenario.versions.values())]
    mesh = parse_mesh(yaml.safe_dump(doc, sort_keys=False), "mesh.yaml")
    called = f"services[{mesh.service_names.index(CALLED)}]"

    def warnings(grpc_xds: bool) -> list[str]:
        return [f"{i.path}: {i.message}" for i in lint_mesh(mesh, grpc_xds=grpc_xds) if i.path.startswith(called)]

    for divergence in scenario.divergences:  # gRPC's xDS client's: `meshctl lint --grpc-xds`
        found = warnings("grpc-xds" in divergence.planes)
        assert any(divergence.lint in w for w in found), (divergence.reason, found)
    if not any(set(d.planes) - {"grpc-xds"} for d in scenario.divergences):
        assert warnings(grpc_xds=False) == []


@needs("envoy")
@pytest.mark.slow
def test_meshctl_conformance_runs_the_suite_from_the_package_and_says_what_it_ran() -> None:
    done = meshctl("conformance", "--scenario", "fault-delay", "--plane", "proxyless",
                   "--plane", "sidecar-to-proxyless", "-o", "json", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is True
    (only,) = report["scenarios"]
    assert only["scenario"] == "fault-delay" and set(only["planes"]) == {"proxyless", "sidecar-to-proxyless"}
    assert all(p["problems"] == [] and "OKx3" in p["phases"]["delayed"] for p in only["planes"].values())


def test_meshctl_conformance_refuses_an_unknown_scenario_or_plane_and_lists_them() -> None:
    for flag, value in (("--scenario", "no-such"), ("--plane", "no-such")):
        done = meshctl("conformance", flag, value)
        assert done.returncode == 2 and "no-such" in done.stderr and "expected one of" in done.stderr, done.stderr
    listed = meshctl("conformance", "--list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["planes"] == list(PLANES) and [s["name"] for s in data["scenarios"]] == [s.name for s in SCENARIOS]

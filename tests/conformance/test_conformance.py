"""Every conformance scenario (scenarios.yaml) on every plane (planes.py): one mesh.yaml, one behaviour.

Each test is one scenario run on every plane in turn; it fails when a plane's outcome misses the scenario's
expectation (or, for a documented divergence, the divergent outcome the scenario records), printing the
table of what each plane did. `make test` runs them with the rest of the suite; `make conformance` runs only
them, printing each table.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml
from binaries import needs
from planes import CALLED, Reply, World, mesh_doc, world
from scenario import PLANES, Outcome, Phase, PhaseResult, Scenario, check, docs_with_table, load, markdown_table, table

from aivo_mesh.config.loader import parse_mesh
from aivo_mesh.lint.envoy import lint_mesh
from aivo_mesh.pki import CertLayout

SCENARIOS = load()
pytestmark = [needs("envoy"), pytest.mark.slow, pytest.mark.timeout(900)]


async def run_phase(w: World, phase: Phase) -> PhaseResult:
    w.script.behaviour = phase.server
    if phase.stop_instance is not None:
        await w.stop(phase.stop_instance)
    if phase.remove_instance is not None:
        await w.remove(phase.remove_instance)
    if phase.change is not None:
        await w.change(phase.change)
    for i in range(phase.settle):
        await w.call(phase.method, f"{phase.name}:settle:{i}".encode())
    before = w.script.reached
    result = PhaseResult()
    payloads: list[bytes] = []
    if phase.recover:
        bound = phase.expect.ok_within or 10.0
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 2 * bound:
            payload = f"{phase.name}:{i}".encode()
            i += 1
            reply = await w.call(phase.method, payload)
            payloads.append(payload)
            result.outcomes.append(Outcome(reply.code, reply.details, reply.seconds, 0, reply.answered_by,
                                           reply.trailers))
            if reply.code == "OK":
                result.recovered_after = time.monotonic() - started
                break
            await asyncio.sleep(0.05)
    else:
        gate = asyncio.Semaphore(phase.concurrency)

        async def one(i: int) -> tuple[bytes, Reply]:
            payload = f"{phase.name}:{i}".encode()
            async with gate:
                return payload, await w.call(phase.method, payload)

        for payload, reply in await asyncio.gather(*(one(i) for i in range(phase.calls))):
            payloads.append(payload)
            result.outcomes.append(Outcome(reply.code, reply.details, reply.seconds, 0, reply.answered_by,
                                           reply.trailers))
    # Attempts are counted as they reach the app: read once every call of the phase has ended.
    result.outcomes = [Outcome(o.code, o.details, o.seconds, w.script.attempts[p], o.answered_by, o.trailers)
                       for o, p in zip(result.outcomes, payloads, strict=True)]
    result.reached = w.script.reached - before
    return result


def planes_of(scenario: Scenario) -> tuple[str, ...]:
    return scenario.planes or tuple(PLANES)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario_behaves_the_same_on_every_plane(scenario: Scenario, mesh_certs: CertLayout, tmp_path: Path):
    results: dict[str, dict[str, PhaseResult]] = {}
    problems: dict[str, list[str]] = {}
    for plane in planes_of(scenario):
        results[plane] = {}
        async with world(plane, scenario, mesh_certs, tmp_path / plane) as w:
            for phase in scenario.phases:
                result = results[plane][phase.name] = await run_phase(w, phase)
                expect, divergence = scenario.expectation(plane, phase)
                found = check(expect, result)
                if divergence is not None and found:
                    found = [f"documented divergence ({divergence.reason}) no longer as recorded: {p}" for p in found]
                problems.setdefault(plane, []).extend(f"{phase.name}: {p}" for p in found)
    report = table(scenario, results, problems)
    print(report)
    assert not any(problems.values()), report


def test_docs_planes_md_carries_the_suites_table() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "planes.md"
    text = docs.read_text()
    wanted = docs_with_table(text, markdown_table(SCENARIOS, tuple(PLANES)))
    assert text == wanted, ("docs/planes.md's conformance table is stale: "
                            "run `python tests/conformance/scenario.py --write`")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_meshctl_lint_warns_of_each_documented_divergence_and_of_nothing_else(scenario: Scenario) -> None:
    """A user whose mesh.yaml asks for what a plane cannot do hears it from `meshctl lint`, before any call."""
    doc = mesh_doc(scenario)
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

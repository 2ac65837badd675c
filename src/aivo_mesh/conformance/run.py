"""Playing a scenario's phases on each plane, and what each plane showed against what was expected."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aivo_mesh.conformance.planes import Reply, World, world
from aivo_mesh.conformance.scenario import PLANES, Outcome, Phase, PhaseResult, Scenario, check, table
from aivo_mesh.pki import CertLayout


async def run_phase(w: World, phase: Phase) -> PhaseResult:
    """`phase` on the running `w`: its server behaviour, its change of the mesh, then its calls."""
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
            await asyncio.sleep(0.05)  # the pace of the probing calls, not a wait for readiness
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


@dataclass
class ScenarioRun:
    """One scenario on some planes: each phase's result per plane, and what each plane missed."""

    scenario: Scenario
    results: dict[str, dict[str, PhaseResult]] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not any(self.problems.values())

    def table(self) -> str:
        return table(self.scenario, self.results, self.problems)

    def as_data(self) -> dict[str, Any]:
        return {"scenario": self.scenario.name, "summary": self.scenario.summary, "passed": self.passed,
                "planes": {plane: {"phases": {name: r.summary() for name, r in phases.items()},
                                   "problems": self.problems.get(plane, [])}
                           for plane, phases in self.results.items()}}


def planes_of(scenario: Scenario, wanted: Sequence[str] = ()) -> tuple[str, ...]:
    return tuple(p for p in (scenario.planes or tuple(PLANES)) if not wanted or p in wanted)


async def run_scenario(scenario: Scenario, base: Mapping[str, Any], certs: CertLayout, work: Path,
                       planes: Sequence[str] = (),
                       on_plane: Callable[[str], None] | None = None) -> ScenarioRun:
    """`scenario` on each of `planes` (default: every plane it names) in turn, files under `work`."""
    run = ScenarioRun(scenario)
    for plane in planes_of(scenario, planes):
        if on_plane is not None:
            on_plane(plane)
        run.results[plane] = {}
        async with world(plane, scenario, base, certs, work / plane) as w:
            for phase in scenario.phases:
                result = run.results[plane][phase.name] = await run_phase(w, phase)
                expect, divergence = scenario.expectation(plane, phase)
                found = check(expect, result)
                if divergence is not None and found:
                    found = [f"documented divergence ({divergence.reason}) no longer as recorded: {p}" for p in found]
                run.problems.setdefault(plane, []).extend(f"{phase.name}: {p}" for p in found)
    return run

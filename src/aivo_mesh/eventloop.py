"""The event loop the mesh's processes run on: uvloop where it is installed, else asyncio's own.

    import aivo_mesh

    async def main() -> None:
        async with MeshClient(config) as client:
            ...

    aivo_mesh.run(main())          # asyncio.run(main()), on uvloop when it is installed, and the
                                   # process scheduled as a batch workload (aivo_mesh.scheduling)

grpc.aio runs on uvloop, and on it a MeshClient/MeshServer pair does ~1.1x the calls per second of the
same pair on asyncio's default loop on 2 cores (docs/benchmarks.md): grpc's completion queue and the
mesh's policy stack are callbacks and tasks, and uvloop schedules both for less CPU. uvloop is a
declared dependency on Linux and macOS (pyproject.toml); elsewhere (Windows, PyPy) `run` falls back to
asyncio's loop. `meshctl serve` (and so every service `meshctl up` starts) runs on `run`, and says in
its "serving on" log line which loop and which scheduling policy it got.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, get_args

from aivo_mesh.envchoice import choose
from aivo_mesh.scheduling import SchedulingChoice
from aivo_mesh.scheduling import apply as apply_scheduling
from aivo_mesh.scheduling import choice_from_env as scheduling_choice

T = TypeVar("T")

LoopChoice = Literal["auto", "uvloop", "asyncio"]
LOOPS: tuple[str, ...] = get_args(LoopChoice)
# Overrides `run`'s default choice for a whole process tree (`meshctl up` passes its environment on).
LOOP_ENV = "AIVO_MESH_EVENT_LOOP"


def loop_factory(loop: LoopChoice = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop for `loop`: uvloop's for "uvloop", and for "auto" when uvloop is installed;
    None (asyncio's default) for "asyncio" or when it is not. "uvloop" without uvloop: ImportError."""
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """"uvloop" or "asyncio": which loop `loop` (default: the running one) is, for log lines."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], *, loop: LoopChoice | None = None,
        scheduling: SchedulingChoice | None = None, debug: bool | None = None) -> T:
    """Run `main` to completion on a new event loop, as `asyncio.run` does, and return its result.

    `loop`: "auto" (uvloop when it is installed, else asyncio's loop), "uvloop" (ImportError without
    it) or "asyncio". None: `$AIVO_MESH_EVENT_LOOP` if set, else "auto".
    `scheduling` (aivo_mesh.scheduling): "auto" (SCHED_BATCH where Linux has it), "batch" (an error
    without it) or "inherit" (as started). None: `$AIVO_MESH_SCHEDULING` if set, else "auto". Applied
    before the loop starts, so every thread grpc starts later inherits it.
    """
    try:
        choice = loop_choice(loop)
        apply_scheduling(scheduling_choice(scheduling))
    except BaseException:
        main.close()  # never to run: no "was never awaited" warning on top of the error
        raise
    with asyncio.Runner(debug=debug, loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def loop_choice(loop: LoopChoice | None) -> LoopChoice:
    """`loop`, else `$AIVO_MESH_EVENT_LOOP`, else "auto" (a bad variable: ConfigError, aivo_mesh.envchoice)."""
    return choose(loop, LOOP_ENV, LOOPS, "loop")  # type: ignore[return-value]  # one of LOOPS

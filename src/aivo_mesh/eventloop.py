"""The event loop the mesh's processes run on: uvloop where it is installed, else asyncio's own.

    import aivo_mesh

    async def main() -> None:
        async with MeshClient(config) as client:
            ...

    aivo_mesh.run(main())          # asyncio.run(main()), on uvloop when it is installed

grpc.aio runs on uvloop, and on it a MeshClient/MeshServer pair does ~1.1x the calls per second of the
same pair on asyncio's default loop on 2 cores (docs/benchmarks.md): grpc's completion queue and the
mesh's policy stack are callbacks and tasks, and uvloop schedules both for less CPU. uvloop is a
declared dependency on Linux and macOS (pyproject.toml); elsewhere (Windows, PyPy) `run` falls back to
asyncio's loop. `meshctl serve` (and so every service `meshctl up` starts) runs on `run`, and says in
its "serving on" log line which loop it got.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

LoopChoice = Literal["auto", "uvloop", "asyncio"]
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


def run(main: Coroutine[Any, Any, T], *, loop: LoopChoice | None = None, debug: bool | None = None) -> T:
    """Run `main` to completion on a new event loop, as `asyncio.run` does, and return its result.

    `loop`: "auto" (uvloop when it is installed, else asyncio's loop), "uvloop" (ImportError without
    it) or "asyncio". None: `$AIVO_MESH_EVENT_LOOP` if set, else "auto".
    """
    choice = loop or os.environ.get(LOOP_ENV) or "auto"
    if choice not in ("auto", "uvloop", "asyncio"):
        main.close()  # never to run: no "was never awaited" warning on top of the error
        raise ValueError(f"{LOOP_ENV}={choice!r}: expected auto, uvloop or asyncio")
    with asyncio.Runner(debug=debug, loop_factory=loop_factory(choice)) as runner:  # type: ignore[arg-type]
        return runner.run(main)

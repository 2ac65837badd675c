"""Starting and stopping mesh processes on this machine, by pid, leaving nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aivo_mesh.runtime.state import ProcessRecord, StateDir, pid_alive


@dataclass
class Managed:
    name: str
    role: str
    argv: list[str]
    address: str
    admin: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()  # variables of our own environment the child must not inherit
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    log: Path | None = None

    def record(self) -> ProcessRecord:
        assert self.process is not None
        return ProcessRecord(self.name, self.process.pid, self.role, self.address, self.admin,
                             self.started_at, str(self.log))


def meshctl_argv(*args: str) -> list[str]:
    """Run meshctl with this interpreter, so child processes use the same environment."""
    return [sys.executable, "-m", "aivo_mesh", *args]


class Supervisor:
    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.procs: list[Managed] = []

    async def start(self, m: Managed) -> None:
        m.log = self.state.log_file(m.name)
        env = {**{k: v for k, v in os.environ.items() if k not in m.unset}, **m.env, "PYTHONUNBUFFERED": "1"}
        with m.log.open("ab") as log:
            # A new session: Ctrl-C in the terminal reaches us, and we stop children in order.
            m.process = await asyncio.create_subprocess_exec(
                *m.argv, stdout=log, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                env=env, start_new_session=True)
        m.started_at = time.time()
        self.procs.append(m)
        self.state.write_processes([p.record() for p in self.procs])

    def exited(self) -> list[Managed]:
        return [m for m in self.procs if m.process is not None and m.process.returncode is not None]

    async def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM everything (reverse start order), then SIGKILL what is left after `grace`."""
        for m in reversed(self.procs):
            if m.process is not None and m.process.returncode is None:
                _signal_group(m.process.pid, signal.SIGTERM)
        await asyncio.gather(*(_wait(m, grace) for m in self.procs))
        self.procs.clear()
        self.state.clear_processes()


async def _wait(m: Managed, grace: float) -> None:
    if m.process is None:
        return
    try:
        await asyncio.wait_for(m.process.wait(), grace)
    except TimeoutError:
        _signal_group(m.process.pid, signal.SIGKILL)
        await m.process.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop_recorded(records: Sequence[ProcessRecord], grace: float = 5.0) -> list[str]:
    """Stop processes recorded by another meshctl (`meshctl down`); returns what was stopped."""
    stopped = []
    for r in reversed(records):
        if pid_alive(r.pid):
            _signal_group(r.pid, signal.SIGTERM)
            stopped.append(r.name)
    deadline = time.monotonic() + grace
    for r in records:
        while pid_alive(r.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(r.pid):
            _signal_group(r.pid, signal.SIGKILL)
    return stopped

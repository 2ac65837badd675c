"""`aivo_mesh.run` schedules the process as a batch workload (aivo_mesh.scheduling): every thread, grpc's
included, runs under SCHED_BATCH where Linux has it; an operator's policy and nice value are kept.

A process's policy is process-wide state, so each case that changes it runs in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import can_batch

from aivo_mesh import scheduling
from aivo_mesh.errors import ConfigError
from aivo_mesh.eventloop import run
from aivo_mesh.scheduling import SCHEDULING_ENV, SchedulingError

ROOT = Path(__file__).resolve().parents[1]


needs_batch = pytest.mark.skipif(not can_batch(), reason="needs Linux's SCHED_BATCH, settable by this process")

# Starts a thread before `run` and one inside it, opens a grpc.aio channel (grpc starts its poller and
# EventEngine threads then) and reports every thread's policy, the nice value and what `run` said.
CHILD = textwrap.dedent("""
    import asyncio, json, os, sys, threading
    import aivo_mesh
    from aivo_mesh.scheduling import policy_name

    stop = threading.Event()
    before = threading.Thread(target=stop.wait, daemon=True)
    before.start()

    async def main():
        import grpc
        inside = threading.Thread(target=stop.wait, daemon=True)
        inside.start()
        channel = grpc.aio.insecure_channel("127.0.0.1:9")
        channel.get_state(try_to_connect=True)
        await asyncio.sleep(0)
        threads = {t: policy_name(int(t)) for t in os.listdir("/proc/self/task")}
        await channel.close()
        return {"threads": threads, "named": [before.native_id, inside.native_id],
                "nice": os.getpriority(os.PRIO_PROCESS, 0), "main": policy_name()}

    kwargs = json.loads(sys.argv[1])
    print(json.dumps(aivo_mesh.run(main(), **kwargs)))
""")


def _child(kwargs: dict[str, Any] | None = None, env: dict[str, str] | None = None,
           start_as: str | None = None, nice: int = 0) -> dict[str, Any]:
    def before_exec() -> None:
        if nice:
            os.nice(nice)
        if start_as == "idle":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    environ = {k: v for k, v in os.environ.items() if k != SCHEDULING_ENV} | (env or {})
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kwargs or {})], capture_output=True, text=True,
                          env=environ, cwd=ROOT, preexec_fn=before_exec, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


@needs_batch
def test_run_makes_every_thread_a_batch_thread_grpcs_included() -> None:
    out = _child()
    # The main thread, a thread started before `run`, one started inside it, and grpc's own threads.
    assert len(out["threads"]) >= 4, out
    assert set(out["threads"].values()) == {"batch"}, out
    assert all(str(tid) in out["threads"] for tid in out["named"])
    assert out["main"] == "batch"
    assert out["nice"] == 0


@needs_batch
def test_the_nice_value_is_kept() -> None:
    out = _child(nice=3)
    assert out["nice"] == 3 and set(out["threads"].values()) == {"batch"}, out


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_inherit_leaves_the_policy_as_started(how: str) -> None:
    out = _child({"scheduling": "inherit"}) if how == "argument" else _child(env={SCHEDULING_ENV: "inherit"})
    assert set(out["threads"].values()) == {"normal"}, out


@needs_batch
def test_the_argument_wins_over_the_environment() -> None:
    out = _child({"scheduling": "auto"}, env={SCHEDULING_ENV: "inherit"})
    assert set(out["threads"].values()) == {"batch"}, out


@needs_batch
def test_an_operators_policy_is_kept() -> None:
    """Started under SCHED_IDLE (as `chrt --idle` does): "auto" changes nothing; even "batch" leaves the
    threads that are not under the default policy."""
    out = _child(start_as="idle")
    assert set(out["threads"].values()) == {"idle"}, out
    out = _child({"scheduling": "batch"}, start_as="idle")
    assert set(out["threads"].values()) == {"idle"}, out


def test_a_bad_choice_is_refused_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []

    async def main() -> None:
        ran.append(True)

    monkeypatch.setenv(SCHEDULING_ENV, "fast")
    with pytest.raises(ConfigError, match=f"environment: {SCHEDULING_ENV}: 'fast': expected one of auto, batch, "
                                          "inherit"):
        run(main())
    monkeypatch.delenv(SCHEDULING_ENV)
    with pytest.raises(ValueError, match="scheduling 'fifo': expected one of auto, batch, inherit"):
        run(main(), scheduling="fifo")  # type: ignore[arg-type]
    assert ran == []  # and no "coroutine was never awaited" warning: the coroutine was closed


def test_without_sched_batch_auto_does_nothing_and_batch_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on macOS or Windows: the process runs as it was started; asking for batch says why it cannot."""
    monkeypatch.setattr(scheduling, "supported", lambda: False)
    before = scheduling.policy_name()
    assert scheduling.apply("auto") == before
    with pytest.raises(SchedulingError, match="no SCHED_BATCH"):
        scheduling.apply("batch")

    async def main() -> str:
        return "ran"

    assert run(main(), loop="asyncio") == "ran"  # "auto" by default: runs anyway


@pytest.mark.skipif(not scheduling.supported(), reason="needs Linux's sched_setscheduler")
def test_a_refusal_by_the_system_is_an_error_only_when_batch_was_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A seccomp profile or an LSM may forbid sched_setscheduler: "auto" carries on, "batch" says so."""
    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    assert scheduling.apply("auto") == scheduling.policy_name()
    with pytest.raises(SchedulingError, match="refused SCHED_BATCH"):
        scheduling.apply("batch")


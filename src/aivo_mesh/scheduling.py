"""How the kernel schedules a mesh process's threads: as a batch workload (SCHED_BATCH) where Linux has it.

    aivo_mesh.run(main())                          # uvloop, and SCHED_BATCH where Linux has it
    aivo_mesh.run(main(), scheduling="inherit")    # leave the policy the process was started with
    AIVO_MESH_SCHEDULING=inherit meshctl up        # the same for every process of a local mesh

grpc.aio runs each call on three kinds of thread: the event loop thread, which runs all of the Python;
a poller thread that hands each of grpc core's completion events to the loop (one byte written to a
socket pair per event); and grpc's EventEngine workers (sockets, TLS). Under Linux's default policy a
thread that wakes up preempts a running one that has had more CPU, so on a busy machine the loop thread
was preempted about five times per call on a MeshServer, once per event the poller handed over, each a
context switch both ways and the loop's caches refilled. Under SCHED_BATCH the kernel treats every
thread as CPU-bound and a thread that wakes does not preempt the running one (sched(7): the policy for
workloads that want one "without interactivity causing extra preemptions"); it runs when a CPU is free
or at the next scheduler tick, and the loop takes several events per turn. On 2 cores at c=32, a
grpc.aio client and server then use about a fifth less CPU per call and serve about a quarter more calls
per second, with or without the mesh (docs/benchmarks.md). Idle latency does not change: a thread that
wakes on an idle CPU runs at once under either policy.

What it costs: on a machine shared with interactive, latency-sensitive work, the mesh's threads give way
to it on wake-ups (that is the policy). The nice value is kept, and so is any policy an operator chose
(SCHED_IDLE, a real-time one): only threads under the default policy are changed. Threads made later
inherit the policy of the thread that makes them, so `apply` runs before grpc starts its threads
(`aivo_mesh.run` does it first) and also changes the threads the process already has.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

from aivo_mesh.envchoice import choose

SchedulingChoice = Literal["auto", "batch", "inherit"]
# Overrides `aivo_mesh.run`'s default for a whole process tree (`meshctl up` passes its environment on).
SCHEDULING_ENV = "AIVO_MESH_SCHEDULING"
CHOICES: tuple[str, ...] = get_args(SchedulingChoice)

_NAMES = {getattr(os, attr): name for attr, name in (
    ("SCHED_OTHER", "normal"), ("SCHED_BATCH", "batch"), ("SCHED_IDLE", "idle"), ("SCHED_FIFO", "fifo"),
    ("SCHED_RR", "rr")) if hasattr(os, attr)}


class SchedulingError(OSError):
    """`scheduling="batch"` was asked for where it cannot be had."""


def supported() -> bool:
    """Whether this system has SCHED_BATCH (Linux); whether it lets this process take it, only trying says."""
    return hasattr(os, "SCHED_BATCH") and hasattr(os, "sched_setscheduler") and os.path.isdir("/proc/self/task")


def policy_name(tid: int = 0) -> str:
    """The scheduling policy of a thread (0: the calling one): "normal", "batch", "idle", "fifo", "rr";
    "default" where the system does not say."""
    if not hasattr(os, "sched_getscheduler"):
        return "default"
    return _NAMES.get(os.sched_getscheduler(tid), "default")


def apply(choice: SchedulingChoice = "auto") -> str:
    """Make this process a batch workload per `choice`, and return the policy it runs under.

    "auto": SCHED_BATCH where the system has it and the process runs under the default policy, else
    nothing; "batch": the same, but a system without it is an error (SchedulingError); "inherit": nothing.
    Only threads under the default policy are changed (an operator's choice is kept)."""
    if choice not in CHOICES:
        raise ValueError(f"scheduling {choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "inherit":
        return policy_name()
    if not supported():
        if choice == "batch":
            raise SchedulingError("scheduling 'batch': this system has no SCHED_BATCH (it is Linux's)")
        return policy_name()
    if choice == "auto" and os.sched_getscheduler(0) != os.SCHED_OTHER:
        return policy_name()  # started under another policy on purpose (e.g. `chrt --idle`): keep it
    batch = os.sched_param(0)  # SCHED_BATCH has no static priority; the nice value stays as it is
    for tid in sorted(int(t) for t in os.listdir("/proc/self/task")):
        try:
            if os.sched_getscheduler(tid) == os.SCHED_OTHER:
                os.sched_setscheduler(tid, os.SCHED_BATCH, batch)
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except PermissionError as err:  # a seccomp profile or an LSM may forbid it
            if choice == "batch":
                raise SchedulingError(f"scheduling 'batch': the system refused SCHED_BATCH ({err})") from err
            return policy_name()
    return policy_name()


def choice_from_env(choice: SchedulingChoice | None) -> SchedulingChoice:
    """`choice`, else `$AIVO_MESH_SCHEDULING`, else "auto" (a bad variable: ConfigError, aivo_mesh.envchoice)."""
    return choose(choice, SCHEDULING_ENV, CHOICES, "scheduling")  # type: ignore[return-value]  # one of CHOICES

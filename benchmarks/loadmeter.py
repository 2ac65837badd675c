"""CPU accounting for one benchmark window: our processes' CPU and everybody else's.

The benchmarks measure CPU µs per request per process from /proc/<pid>/stat (utime + stime, all
threads) over the window, and rerun a window that saw more than 0.25 cores of foreign load. Of that CPU,
the kernel's part (stime: sockets, TLS records' syscalls, wake-ups) and the context switches of every
thread (/proc/<pid>/task/*/status) are kept too: on grpc.aio they are much of a call's cost and the same
for any Python on top, which a CPU figure alone does not show. This is
that meter. Foreign load is what the machine spent on anything but the processes under test: other
processes in this VM, plus steal (time the hypervisor gave our vCPUs to other tenants). On the
development VM it stays under 0.1 cores while rounds still swing by ±10 %: most of the spread comes
from the run itself (how many calls grpc batches per wake-up), not from other tenants.

    meter = LoadMeter({"client": os.getpid(), "server": server.pid})
    meter.start()
    ...                                   # the measured window
    window = meter.stop()                 # Window(seconds, cpu={"client": s, ...}, foreign_cores=...)
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

R = TypeVar("R")

TICK = os.sysconf("SC_CLK_TCK")


def _machine() -> tuple[int, int]:
    """(busy ticks of every CPU, steal ticks) since boot.

    Softirq time is left out: it is mostly the loopback TCP traffic of the processes under test,
    which the kernel charges to no process (0.1-0.15 cores in the sidecar benchmark)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, _softirq, steal = fields[:8]
    return user + nice + system + irq, steal


def process_times(pid: int) -> tuple[int, int]:
    """(utime + stime, stime) of every thread of `pid`, in clock ticks, from one read ((0, 0) once it
    has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(rest[11]) + int(rest[12]), int(rest[12])


def process_ticks(pid: int) -> int:
    """utime + stime of every thread of `pid`, in clock ticks (0 once it has exited)."""
    return process_times(pid)[0]


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of the threads `pid` has now (/proc/<pid>/status counts
    its main thread's only); a thread that exited takes its count with it."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                total += sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
        except OSError:
            continue
    return total


@dataclass(frozen=True, slots=True)
class Window:
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per named process
    foreign_cores: float = 0.0  # average cores busy with anything else, steal included
    steal_cores: float = 0.0
    kernel: dict[str, float] = field(default_factory=dict)  # of `cpu`, seconds in the kernel (stime)
    switches: dict[str, int] = field(default_factory=dict)  # context switches per named process

    def cpu_us_per(self, requests: int) -> dict[str, float]:
        return {k: 1e6 * v / requests for k, v in self.cpu.items()} if requests else {}

    def kernel_us_per(self, requests: int) -> dict[str, float]:
        return {k: 1e6 * v / requests for k, v in self.kernel.items()} if requests else {}

    def switches_per(self, requests: int) -> dict[str, float]:
        return {k: v / requests for k, v in self.switches.items()} if requests else {}


class LoadMeter:
    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._t0 = 0.0
        self._busy0 = self._steal0 = 0
        self._times0: dict[str, tuple[int, int]] = {}
        self._switches0: dict[str, int] = {}

    def start(self) -> None:
        self._switches0 = {k: context_switches(p) for k, p in self.pids.items()}
        self._times0 = {k: process_times(p) for k, p in self.pids.items()}
        self._busy0, self._steal0 = _machine()
        self._t0 = time.monotonic()

    def stop(self) -> Window:
        seconds = time.monotonic() - self._t0
        busy, steal = _machine()
        times = {k: process_times(p) for k, p in self.pids.items()}
        ours = {k: (t[0] - self._times0[k][0]) / TICK for k, t in times.items()}
        kernel = {k: (t[1] - self._times0[k][1]) / TICK for k, t in times.items()}
        switches = {k: max(0, context_switches(p) - self._switches0[k]) for k, p in self.pids.items()}
        busy_s, steal_s = (busy - self._busy0) / TICK, (steal - self._steal0) / TICK
        foreign = max(0.0, busy_s - sum(ours.values())) + steal_s
        return Window(seconds, ours, foreign / seconds if seconds else 0.0, steal_s / seconds if seconds else 0.0,
                      kernel, switches)


async def quiet_rounds(reps: int, names: Sequence[str],
                       run_round: Callable[[list[str]], Awaitable[tuple[R, float, str]]], *,
                       max_foreign: float, max_reruns: int) -> tuple[list[R], int]:
    """`reps` rounds of every case, each starting from another case so drifting load hits all alike.

    `run_round(order)` measures the cases in that order and returns the round's result, the most
    foreign load (cores) any of its windows saw, and a line to print. A round over `max_foreign` is
    measured again, the baselines' rule, until `max_reruns` reruns are spent. Returns the kept rounds
    and the number of reruns.
    """
    kept: list[R] = []
    rerun = 0
    while len(kept) < reps:
        k = (len(kept) + rerun) % len(names)
        result, foreign, line = await run_round([*names[k:], *names[:k]])
        if foreign > max_foreign and rerun < max_reruns:
            rerun += 1
            print(f"rerun     {line}  foreign {foreign:.2f} cores", flush=True)
            continue
        kept.append(result)
        print(f"round {len(kept):2d}  {line}  foreign {foreign:.2f} cores", flush=True)
    return kept, rerun

"""The benchmarks' CPU meter (benchmarks/loadmeter.py) charges a process the CPU it used."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from loadmeter import TICK, LoadMeter, context_switches, process_ticks, process_times, quiet_rounds

pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")

# Burns CPU until killed, or until it has used 30 s of it.
BURN = "import time\nwhile time.process_time() < 30: pass\n"


def wait_for_ticks(pid: int, ticks: int, bound: float = 20.0) -> None:
    deadline = time.monotonic() + bound
    while process_ticks(pid) < ticks:
        assert time.monotonic() < deadline, f"process {pid} used < {ticks} ticks in {bound} s"
        time.sleep(0.01)


def test_a_burning_process_is_charged_its_cpu_within_the_window() -> None:
    child = subprocess.Popen([sys.executable, "-c", BURN])
    try:
        wait_for_ticks(child.pid, 1)
        meter = LoadMeter({"burner": child.pid})
        meter.start()
        wait_for_ticks(child.pid, process_ticks(child.pid) + int(0.3 * TICK))
        window = meter.stop()
    finally:
        child.kill()
        child.wait()
    assert window.cpu["burner"] >= 0.3
    # One thread cannot use more CPU than wall time (plus one tick of rounding at each end).
    assert window.cpu["burner"] <= window.seconds + 2 / TICK
    assert window.cpu_us_per(1000)["burner"] == pytest.approx(1e3 * window.cpu["burner"])
    assert window.cpu_us_per(0) == {}


def test_an_exited_process_reads_zero_ticks() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_ticks(child.pid) == context_switches(child.pid) == 0
    assert process_times(child.pid) == (0, 0)


def test_a_window_counts_the_kernels_part_and_every_threads_context_switches() -> None:
    """A child whose second thread sleeps 300 times (a voluntary switch each) while the main thread waits
    on it: the switches are counted for all threads, not only the main one (which /proc/<pid>/status
    reports), and the kernel's time is part of the CPU time. The thread lives until the window ends (an
    exited thread takes its count with it)."""
    script = ("import sys, threading, time\n"
              "def naps():\n    for _ in range(300): time.sleep(0.001)\n"
              "    print('done', flush=True)\n    sys.stdin.readline()\n"
              "sys.stdin.readline()\nt = threading.Thread(target=naps)\nt.start()\nt.join()\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        meter = LoadMeter({"napper": child.pid})
        meter.start()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "done\n"
        window = meter.stop()
    finally:
        child.kill()
        child.wait()
    assert window.switches["napper"] >= 300, window
    assert 0 <= window.kernel["napper"] <= window.cpu["napper"]
    assert window.switches_per(300)["napper"] == window.switches["napper"] / 300
    assert window.kernel_us_per(0) == window.switches_per(0) == {}


def test_quiet_rounds_rerun_a_loaded_round_and_rotate_the_starting_case() -> None:
    foreign = iter([0.0, 0.9, 0.1, 0.9, 0.9])  # loaded attempts 2, 4 and 5; two reruns allowed
    orders: list[list[str]] = []

    async def one_round(order: list[str]) -> tuple[str, float, str]:
        orders.append(order)
        return order[0], next(foreign), ""

    kept, rerun = asyncio.run(quiet_rounds(3, ["a", "b", "c"], one_round, max_foreign=0.25, max_reruns=2))
    assert rerun == 2
    # Every attempt, rerun or not, starts from the next case.
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"], ["b", "c", "a"]]
    assert kept == ["a", "c", "b"]  # the last round is kept despite its load: the reruns were spent

"""Local runs with real processes: Ctrl-C while `meshctl up` starts, `make demo`'s state found by `traces`,
`status` and `down` without flags, and a demo started while your own `meshctl up` mesh holds its ports."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import helpers
import pytest
from helpers import checkout_env, interruptible
from waiting import until

from aivo_mesh.runtime.state import DEFAULT_STATE_DIR, DEMO_STATE_DIR, STATE_DIR_ENV, StateDir, pid_alive
from aivo_mesh.runtime.supervisor import meshctl_argv

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def meshctl(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Without a state dir chosen by the variable (the rule under test picks it); a demo takes a while."""
    return helpers.meshctl(*args, cwd=cwd, timeout=180, unset=[STATE_DIR_ENV])


def processes_naming(text: str) -> dict[int, str]:
    """Live processes whose command line contains `text` (every process of a local mesh names its state dir)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited meanwhile
            continue
        if text in cmdline:
            found[int(proc.name)] = cmdline
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="lists processes through /proc")
def test_ctrl_c_while_up_starts_stops_everything_it_started(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "mesh")
    up = subprocess.Popen(meshctl_argv("up", "--plane", "sidecar", "--free-ports", "--state-dir", str(state.root),
                                       "--timeout", "120"), cwd=ROOT, env=checkout_env([STATE_DIR_ENV]),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    try:
        # Interrupt while it starts: its supervisor runs and has started at least its first child.
        asyncio.run(until(lambda: up.poll() is not None or (state.supervisor_pid() is not None
                                                             and bool(state.read_processes())),
                          60, "the supervisor starting its children"))
        assert up.poll() is None, up.communicate()
        started = {state.supervisor_pid(), *(r.pid for r in state.read_processes())}
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground process
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        leftovers = processes_naming(str(state.root))
        if leftovers:
            meshctl("down", "--state-dir", str(state.root))
    assert up.returncode == 130, out + err
    assert "Traceback" not in err
    assert f"interrupted: stopping what `meshctl up` started from {state.root}" in " ".join(out.split())
    assert "mesh down (supervisor" in out
    assert leftovers == {}
    assert not any(pid is not None and pid_alive(pid) for pid in started)
    assert not state.registry.exists() and not state.supervisor_pid_file.exists()
    assert not (state.root / "run").exists()  # the sidecar plane's socket folder went with the processes


def test_traces_status_and_down_find_what_make_demo_ran(tmp_path: Path) -> None:
    """`make demo` prints "(meshctl traces shows more)": with no flag, `meshctl traces` must look where the
    demo put its spans."""
    demo = meshctl("demo", "--plane", "proxyless", "--free-ports", "--duration", "1", "--timeout", "90",
                   "--config", str(ROOT / "mesh.yaml"), cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "meshctl traces shows more" in demo.stdout
    # The last few, not the last one: the flow in flight when the demo stopped may have left part of a trace.
    traces = meshctl("traces", "--service", "learner-svc", "--last", "5", cwd=tmp_path)
    assert traces.returncode == 0, traces.stderr
    assert "/aivo.learner.v1.LearnerService/GetProfile" in traces.stdout, traces.stdout
    status = meshctl("status", "--json", cwd=tmp_path)
    shown = json.loads(status.stdout)
    assert (shown["state_dir"], shown["processes"], shown["services"]) == (str(DEMO_STATE_DIR), [], [])
    down = meshctl("down", cwd=tmp_path)
    assert f"mesh down (nothing was running) from {DEMO_STATE_DIR}" in down.stdout


def test_a_demo_while_your_mesh_runs_says_once_that_it_holds_the_ports(tmp_path: Path) -> None:
    up = meshctl("up", "--plane", "proxyless", "--free-ports", "--timeout", "90", "--config",
                 str(ROOT / "mesh.yaml"), cwd=tmp_path)
    state = StateDir(tmp_path / DEFAULT_STATE_DIR)
    pids = [r.pid for r in state.read_processes()]
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        # The demo on the same ports (`make demo` while `meshctl up` runs, both on mesh.yaml's).
        demo = meshctl("demo", "--plane", "proxyless", "--duration", "1", "--config",
                       str(DEFAULT_STATE_DIR / "mesh.yaml"), cwd=tmp_path)
        assert demo.returncode == 2, demo.stdout + demo.stderr
        assert "in use" not in demo.stderr
        lines = demo.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert f"are held by your mesh running from {DEFAULT_STATE_DIR}: stop it with `meshctl down " \
               f"--state-dir {DEFAULT_STATE_DIR}`, or give this run other ports with --free-ports" in lines[0]
        # The demo started nothing, and the running mesh is untouched.
        assert not (tmp_path / DEMO_STATE_DIR / "processes.json").exists()
        assert all(pid_alive(p) for p in pids)
        # A demo in the running mesh's own state dir would rewrite its files: refused before anything.
        inside = meshctl("demo", "--plane", "proxyless", "--state-dir", str(DEFAULT_STATE_DIR), cwd=tmp_path)
        assert inside.returncode == 1, inside.stdout + inside.stderr
        assert f"a mesh is running from {DEFAULT_STATE_DIR} (meshctl down --state-dir {DEFAULT_STATE_DIR})" \
            in inside.stderr
        assert all(pid_alive(p) for p in pids) and [r.pid for r in state.read_processes()] == pids
        # status finds the running mesh without a flag.
        status = json.loads(meshctl("status", "--json", "--interval", "0", cwd=tmp_path).stdout)
        assert status["state_dir"] == str(DEFAULT_STATE_DIR) and status["plane"] == "proxyless"
    finally:
        down = meshctl("down", cwd=tmp_path)
    assert f"mesh down (supervisor) from {DEFAULT_STATE_DIR}" in down.stdout
    assert pids and not any(pid_alive(p) for p in pids)

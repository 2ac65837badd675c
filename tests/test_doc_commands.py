"""The commands the docs give for a local mesh, run against one: the README's client snippet, and every
command of the shell blocks tagged `meshctl-up` (```` ```sh meshctl-up ````, in README.md,
docs/troubleshooting.md and docs/control-plane.md) and of troubleshooting's table of the guide's commands.

The docs are written for `meshctl up` run from the repository root (sidecar plane, state in
`.state/mesh`, mesh.yaml's ports). Here one such mesh serves the whole module, started with a private
state dir and `--free-ports` so it never meets a developer's mesh: the commands run from a copy of the
repository root (symlinks) whose `.state/mesh` is that mesh, and each `127.0.0.1:<mesh.yaml port>` in a
command or in its shown output becomes the port the mesh really listens on for it. A mesh.yaml port
nothing listens on after `meshctl up` (50051 on the sidecar plane) fails the command's test.

In a block, a comment indented by three spaces under a command (`#   text`) is part of what the
command prints (each such line, in order; `...` stands for anything within a line); `#   (exit status
N)` says the command fails with N. In the table, `` `command` -> `text` `` says the same.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from waiting import until

from aivo_mesh.config import MeshSpec, load_mesh
from aivo_mesh.errors import MeshError
from aivo_mesh.runtime.mesh import RuntimeInfo
from aivo_mesh.runtime.state import StateDir

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
CONTROL_PLANE = ROOT / "docs" / "control-plane.md"
RUN_TAG = "meshctl-up"
# Blocks of troubleshooting.md that are not for the local mesh, and why they are not run.
OTHER_TAGS = {"compose": "runs against the Docker Compose deployment"}
COMMAND_WORDS = ("curl", "meshctl", "openssl", "python", "grpcurl", "promtool", ".venv/bin/")
LOOPBACK_PORT = re.compile(r"(?<=127\.0\.0\.1:)(\d+)\b")


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line, the test's id
    text: str
    expect: tuple[str, ...] = ()
    status: int = 0
    skip: str | None = None


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced_blocks(path: Path, lang: str) -> Iterator[tuple[int, list[str], list[str]]]:
    """(line number of the first body line, the info string's words after `lang`, dedented body lines)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)(.*)$", lines[i])
        if not m:
            i += 1
            continue
        indent, info = len(m.group(1)), m.group(2)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        if info == lang:
            yield i + 2, m.group(3).split(), [line[indent:] for line in lines[i + 1:end]]
        i = end + 1


def block_commands(path: Path, first: int, body: list[str]) -> list[DocCommand]:
    commands: list[DocCommand] = []
    text, start, status = "", 0, 0
    expect: list[str] = []

    def close() -> None:
        nonlocal text, expect, status
        if text:
            commands.append(_command(f"{_rel(path)}:{start}", text, tuple(expect), status))
        text, expect, status = "", [], 0

    for n, line in enumerate(body, first):
        stripped = line.strip()
        if text and text.endswith("\\"):  # a continued command
            text = text + "\n" + line
            continue
        if m := re.match(r"^#   (.*)$", stripped):
            assert text, f"{_rel(path)}:{n}: shown output without a command above it"
            if s := re.fullmatch(r"\(exit status (\d+)\)", m.group(1).strip()):
                status = int(s.group(1))
            else:
                expect.append(m.group(1))
            continue
        if not stripped or stripped.startswith("#"):
            close()
            continue
        close()
        text, start = line, n
    close()
    return commands


def _command(where: str, text: str, expect: tuple[str, ...] = (), status: int = 0) -> DocCommand:
    words = shlex.split(text, comments=True)
    skip = None
    if words[0].endswith("meshctl") and words[1:2] in (["up"], ["down"]):
        skip = "the module's fixture runs `meshctl up` and `meshctl down` itself (private state dir, free ports)"
    elif "8500" in text or words[:2] == ["meshctl", "consul"] or "--consul" in words:
        skip = "needs a Consul agent; `meshctl up` starts none"
    return DocCommand(where, text, expect, status, skip)


def table_commands(path: Path, heading: str) -> list[DocCommand]:
    """The commands (and `-> shown output`) in the 2nd and 3rd columns of the table under `heading`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    at = lines.index(heading)
    commands = []
    for n, line in enumerate(lines[at + 1:], at + 2):
        if line.startswith("## "):
            break
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = line.replace("\\|", "\0").split("|")[1:-1]
        for cell in cells[1:3]:
            for m in re.finditer(r"`([^`]+)`(?:\s*->\s*`([^`]+)`)?", cell):
                code = m.group(1).replace("\0", "|")
                if code.startswith(COMMAND_WORDS):
                    shown = (m.group(2).replace("\0", "|"),) if m.group(2) else ()
                    commands.append(_command(f"{_rel(path)}:{n}", code, shown))
    return commands


def doc_commands() -> list[DocCommand]:
    found = []
    for path in (README, TROUBLESHOOTING, CONTROL_PLANE):
        for first, tags, body in fenced_blocks(path, "sh"):
            if RUN_TAG in tags:
                found += block_commands(path, first, body)
    return found + table_commands(TROUBLESHOOTING, "## The guide's commands, mapped")


COMMANDS = doc_commands()


def readme_snippet() -> tuple[str, str]:
    """The Python block of README's "Using the client" and the ```text block after it (what it prints)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Using the client\n"):]
    section = section[:section.index("\n## ", 1)]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    shown = re.search(r"```text\n(.*?)```", section, re.S)
    assert code and shown
    return code.group(1), shown.group(1)


# --- what the docs are, checked without a mesh ------------------------------------------------------


def test_every_shell_block_of_troubleshooting_says_where_it_runs() -> None:
    tags = [(first, tags) for first, tags, _ in fenced_blocks(TROUBLESHOOTING, "sh")]
    assert tags, "no shell blocks found"
    assert [(first, t) for first, t in tags if not t or t[0] not in (RUN_TAG, *OTHER_TAGS)] == []


def test_the_commands_are_found() -> None:
    """The extraction itself: an unparsed page would pass every test vacuously."""
    texts = [c.text for c in COMMANDS]
    assert any(t.startswith("openssl s_client -connect 127.0.0.1:50061") for t in texts)
    assert any(t.startswith("grpcurl ") for t in texts)
    assert "curl -s 127.0.0.1:9901/ready" in texts  # from the table
    assert any(c.where.startswith("README.md") and "test-mesh.py" in c.text for c in COMMANDS)
    by_where = {c.where: c for c in COMMANDS}
    refused = next(c for c in by_where.values() if c.status)
    assert refused.status == 1 and refused.expect == ("tlsv13 alert certificate required ... SSL alert number 116",)


def test_for_local_mesh_without_a_running_mesh_says_how_to_start_one(tmp_path: Path) -> None:
    from aivo_mesh import MeshConfig

    with pytest.raises(MeshError, match=r"no mesh is running from .*: start one with `meshctl up --state-dir "):
        MeshConfig.for_local_mesh("learner-svc", state_dir=tmp_path / "mesh")


def test_the_seed_import_path_works_from_the_repository_root() -> None:
    out = subprocess.run([sys.executable, "-c", "import aivo_mesh\n"
                          "from infra.mesh.python.mesh_client import MeshClient, MeshConfig\n"
                          "assert (MeshClient, MeshConfig) == (aivo_mesh.MeshClient, aivo_mesh.MeshConfig)\n"
                          "assert callable(MeshConfig.for_local_mesh)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr


# --- against a running mesh -------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalMesh:
    root: Path  # the repository root the commands run from
    env: dict[str, str]
    ports: dict[int, int]  # mesh.yaml's port -> the port listening for it
    idle: frozenset[int]  # mesh.yaml's ports nothing listens on, on this plane

    def run(self, argv: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=self.root, env=self.env, input=stdin, capture_output=True, text=True,
                              timeout=120, check=False)

    def translate(self, text: str, where: str) -> str:
        def port(m: re.Match[str]) -> str:
            n = int(m.group(1))
            assert n not in self.idle, f"{where}: 127.0.0.1:{n} is not listened on after `meshctl up` (sidecar plane)"
            return str(self.ports.get(n, n))

        return LOOPBACK_PORT.sub(port, text)


def _ports(spec: MeshSpec) -> dict[tuple[str, str], int]:
    out = {}
    for s in spec.services:
        for key, value in (("port", s.port), ("local_port", s.local_port), ("admin_port", s.admin_port),
                           ("sidecar.inbound_port", s.sidecar.inbound_port),
                           ("sidecar.outbound_port", s.sidecar.outbound_port),
                           ("sidecar.admin_port", s.sidecar.admin_port)):
            if value is not None:
                out[(s.name, key)] = value
    otlp = spec.observability.tracing.otlp_endpoint or ""
    if m := re.search(r":(\d+)$", otlp):
        out[("collector", "port")] = int(m.group(1))
    return out


def _drive_traffic(state: StateDir) -> None:
    """A few of the platform's flows, so callers hold breakers for their targets and traces exist, as in
    any mesh someone troubleshoots."""
    from aivo_mesh import MeshClient, MeshConfig
    from aivo_mesh.runtime.driver import drive

    async def run() -> None:
        async with MeshClient(MeshConfig.for_local_mesh("mesh-client", state_dir=state.root)) as client:
            stats = await drive(client, 0.3, workers=1)
        assert stats.flows > 0 and stats.total_errors == 0, stats.per_service
        spans = state.root / "traces.jsonl"
        # Spans leave each process within half a second (LOCAL_ENV); the commands read them.
        await until(lambda: spans.exists() and '"service":"auth-svc-sidecar"' in spans.read_text(),
                    10, "a span of auth-svc's Envoy in traces.jsonl")

    asyncio.run(run())


@pytest.fixture(scope="module")
def local_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    root = tmp_path_factory.mktemp("docs") / "repo"
    root.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".state", ".venv"):
            (root / entry.name).symlink_to(entry)
    (root / ".venv").symlink_to(sys.prefix)  # `.venv/bin/meshctl` in the README
    state = StateDir(root / ".state" / "mesh")
    env = {**os.environ, "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "AIVO_MESH_STATE_DIR": str(state.root)}
    meshctl = [sys.executable, "-m", "aivo_mesh"]
    up = subprocess.run([*meshctl, "up", "--state-dir", str(state.root), "--free-ports", "--timeout", "90"],
                        cwd=root, env=env, capture_output=True, text=True, timeout=150, check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        info = RuntimeInfo.read(state)
        assert info is not None and info.plane == "sidecar"
        listening = {int(a.rpartition(":")[2]) for ep in info.services.values()
                     for a in (ep.address, ep.admin, ep.sidecar_admin) if a and not a.startswith("unix:")}
        listening.add(int(info.collector.rpartition(":")[2]))
        ours, theirs = _ports(load_mesh(ROOT / "mesh.yaml")), _ports(load_mesh(state.mesh_file))
        theirs[("collector", "port")] = int(info.collector.rpartition(":")[2])
        ports = {ours[k]: theirs[k] for k in ours if theirs[k] in listening}
        _drive_traffic(state)
        yield LocalMesh(root, env, ports, frozenset(set(ours.values()) - set(ports)))
    finally:
        down = subprocess.run([*meshctl, "down", "--state-dir", str(state.root)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert down.returncode == 0, down.stdout + down.stderr


def assert_shows(output: str, expect: tuple[str, ...], where: str) -> None:
    """Each shown line, in order, within one line of the output; `...` stands for anything in that line."""
    pos = 0
    for line in expect:
        pieces = [p.strip() for p in line.split("...")]
        pattern = "[^\n]*".join(re.escape(p) for p in pieces)
        m = re.compile(pattern).search(output, pos)
        assert m, f"{where}: {line!r} not in the output (after offset {pos}):\n{output}"
        pos = m.end()


@pytest.mark.slow
@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.where)
def test_doc_command(cmd: DocCommand, local_mesh: LocalMesh) -> None:
    if cmd.skip:
        pytest.skip(cmd.skip)
    tool = shlex.split(cmd.text, comments=True)[0]
    if "/" not in tool and shutil.which(tool, path=local_mesh.env["PATH"]) is None:
        pytest.skip(f"{tool} is not installed")
    text = local_mesh.translate(cmd.text, cmd.where)
    out = local_mesh.run(["bash", "-c", "set -o pipefail\n" + text])
    output = out.stdout + out.stderr
    assert out.returncode == cmd.status, f"{cmd.where}: {text}\nexit status {out.returncode}:\n{output}"
    assert_shows(output, tuple(local_mesh.translate(e, cmd.where) for e in cmd.expect), cmd.where)


@pytest.mark.slow
def test_readme_client_snippet_runs_as_written(local_mesh: LocalMesh) -> None:
    code, shown = readme_snippet()
    (local_mesh.root / "client.py").write_text(code)
    out = local_mesh.run([str(Path(sys.prefix) / "bin" / "python"), "client.py"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == shown


@pytest.mark.slow
def test_readme_client_snippet_runs_with_the_seed_import_from_the_repository_root(local_mesh: LocalMesh) -> None:
    code, shown = readme_snippet()
    seed = code.replace("from aivo_mesh import MeshClient, MeshConfig",
                        "from infra.mesh.python.mesh_client import MeshClient, MeshConfig", 1)
    assert seed != code
    # `python -` puts the working directory, the repository root, first on sys.path, as `python -c` does.
    out = local_mesh.run([sys.executable, "-"], stdin=seed)
    assert out.returncode == 0, out.stderr
    assert out.stdout == shown


def test_the_snippets_comment_names_the_address_auth_svc_has_after_meshctl_up() -> None:
    """The snippet's comment names auth-svc's address on the sidecar plane: its sidecar's inbound port."""
    code, _ = readme_snippet()
    auth = load_mesh(ROOT / "mesh.yaml").service("auth-svc")
    assert f"auth-svc's sidecar, 127.0.0.1:{auth.sidecar.inbound_port}" in code

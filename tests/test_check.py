"""`meshctl check`: a healthy project passes (exit 0, ⚠ allowed); each broken input is one ✘ line saying
what to do, and exit 1; with a mesh running, its health (a hung service is a ✘)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import meshctl

from aivo_mesh.cli import main
from aivo_mesh.config import MeshSpec, load_mesh
from aivo_mesh.config.ports import sidecar_ports
from aivo_mesh.pki import CertLayout
from aivo_mesh.pki.issue import build_leaf, load_issuer
from aivo_mesh.runtime.local import dump_mesh, free_port, with_free_ports
from aivo_mesh.runtime.state import StateDir

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["config", "lint", "certificates", "render", "ports", "health"]


class Project:
    """A repository of its own: mesh.yaml on free ports, its rendered files, its certificates."""

    def __init__(self, root: Path, certs: CertLayout) -> None:
        self.root = root
        self.mesh_file = root / "mesh.yaml"
        self.certs = certs
        self.state = root / "state"
        self.otlp = str(free_port())

    @property
    def mesh(self) -> MeshSpec:
        return load_mesh(self.mesh_file)

    def check(self, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, str], str]:
        """(exit code, check name -> its line(s) with single spaces, the whole output)."""
        code = main(["check", "--config", str(self.mesh_file), "-d", str(self.certs.root), "--state-dir",
                     str(self.state), "--otlp-port", self.otlp, *extra])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        lines: dict[str, str] = {}
        last = ""
        for line in out.splitlines():
            parts = line.split()
            if len(parts) > 1 and parts[0] in "✔✘⚠-" and parts[1] in NAMES:
                last = parts[1]
                lines[last] = lines.get(last, "") + " ".join(parts) + "\n"
            elif line.startswith(" ") and last:  # the hint under the last check
                lines[last] += " ".join(parts) + "\n"
        return code, lines, out


@pytest.fixture
def project(tmp_path: Path, mesh_certs: CertLayout, capsys: pytest.CaptureFixture[str]) -> Project:
    (tmp_path / "mesh.yaml").write_text(dump_mesh(with_free_ports(load_mesh(ROOT / "mesh.yaml"))))
    assert main(["render", "all", "--config", str(tmp_path / "mesh.yaml")]) == 0
    shutil.copytree(mesh_certs.root, tmp_path / "certs")
    capsys.readouterr()
    return Project(tmp_path, CertLayout(tmp_path / "certs"))


def test_a_healthy_project_passes(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, out = project.check(capsys)
    assert code == 0, out
    for name in ("config", "lint", "certificates", "render", "ports"):
        assert lines[name].startswith("✔"), out
    assert lines["health"].startswith("- health no mesh running from"), out
    assert out.rstrip().endswith("all checks passed")
    assert "→" not in out  # nothing to do


def test_a_certificate_expiring_soon_is_a_warning(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "issue", "auth-svc", "-d", str(project.certs.root), "--config", str(project.mesh_file),
                 "--valid-days", "10"]) == 0
    capsys.readouterr()
    code, lines, out = project.check(capsys)
    assert code == 0, out
    assert lines["certificates"].startswith("⚠"), out
    assert "auth-svc (9 d)" in lines["certificates"] or "auth-svc (10 d)" in lines["certificates"]
    assert "meshctl certs rotate --renew-before-days 30" in lines["certificates"]
    assert out.rstrip().endswith("all checks passed, 1 warning(s)")
    code, _, out = project.check(capsys, "--expiry-warn-days", "5")
    assert code == 0 and "warning" not in out


def _expire(project: Project, name: str) -> None:
    issuer = load_issuer(project.certs)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = build_leaf(issuer, project.mesh, name, key, 2, datetime.now(UTC) - timedelta(days=10))
    cert_path, key_path = project.certs.identity_paths(name)
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                          + issuer.cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def _key_mode(project: Project) -> None:
    project.certs.identity_paths("learner-svc")[1].chmod(0o644)


def _drift(project: Project) -> None:
    path = project.root / "infra/mesh/envoy/auth-svc/envoy.yaml"
    path.write_text(path.read_text().replace("connect_timeout: ", "connect_timeout:  ", 1) + "# hand edit\n")


def _bad_config(project: Project) -> None:
    project.mesh_file.write_text(project.mesh_file.read_text().replace("trust_domain:", "trust_domian:", 1))


BROKEN: dict[str, tuple[Callable[[Project], None], str, list[str]]] = {
    # what breaks it: (how, the check that fails, what its line and hint say)
    "a leaf key readable by others": (_key_mode, "certificates",
                                      ["1 of 8 certificates have problems: learner-svc:", "group/others",
                                       "meshctl certs rotate learner-svc -d", "meshctl certs verify -d"]),
    "an expired leaf": (lambda p: _expire(p, "auth-svc"), "certificates",
                        ["auth-svc: expired on", "meshctl certs rotate auth-svc -d"]),
    "a rendered file edited by hand": (_drift, "render",
                                       ["1 rendered files differ from mesh.yaml (",
                                        "infra/mesh/envoy/auth-svc/envoy.yaml",
                                        "meshctl render all --check` shows the diff"]),
    "an invalid mesh.yaml": (_bad_config, "config", ["trust_domian", "meshctl config validate"]),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_each_broken_input_is_one_failed_check_saying_what_to_do(
        broken: str, project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    how, failing, phrases = BROKEN[broken]
    how(project)
    code, lines, out = project.check(capsys)
    assert code == 1, out
    assert lines[failing].startswith(f"✘ {failing}"), out
    for phrase in phrases:
        assert phrase in lines[failing], (phrase, out)
    # The others still run (or say why not) and pass.
    others = [n for n in NAMES if n != failing]
    skipped = "needs a valid mesh.yaml" if failing == "config" else None
    for name in others:
        assert lines[name][0] in ("✔", "-"), out
        if skipped and name != "health":
            assert skipped in lines[name]
    assert "1 check(s) failed" in out


def test_a_port_in_use_fails_naming_it_and_its_user(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    port = sidecar_ports(project.mesh, "auth-svc", "local").inbound
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        code, lines, out = project.check(capsys)
        assert code == 1, out
        assert lines["ports"].startswith("✘ ports"), out
        assert f"port {port} in use: auth-svc-envoy inbound" in lines["ports"]
        assert "meshctl up --free-ports" in lines["ports"]
        # The proxyless plane does not listen there.
        code, lines, out = project.check(capsys, "--plane", "proxyless")
        assert code == 0, out
    for name in ("config", "lint", "certificates", "render"):
        assert lines[name].startswith("✔"), out


def test_json_says_the_same(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    _key_mode(project)
    code = main(["check", "--config", str(project.mesh_file), "-d", str(project.certs.root), "--state-dir",
                 str(project.state), "--otlp-port", project.otlp, "-o", "json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1
    assert data["ok"] is False
    assert [c["name"] for c in data["checks"]] == NAMES
    (failed,) = [c for c in data["checks"] if c["status"] == "fail"]
    assert failed["name"] == "certificates" and "meshctl certs rotate learner-svc" in failed["hint"]


# --- with a mesh running ----------------------------------------------------------------------------


@pytest.fixture
def running(project: Project) -> Iterator[StateDir]:
    up = meshctl("up", "--plane", "proxyless", "--free-ports", "--config", str(project.mesh_file),
                 "--state-dir", str(project.state), "--timeout", "90")  # tests assert behaviour, not timings
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield StateDir(project.state)
    finally:
        down = meshctl("down", "--state-dir", str(project.state))
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.mark.slow
def test_with_a_mesh_running_check_reports_each_services_health(
        project: Project, running: StateDir, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, out = project.check(capsys)
    assert code == 0, out
    assert lines["ports"].startswith(f"- ports a mesh runs from {project.state}"), out
    health = lines["health"].splitlines()
    assert len(health) == len(project.mesh.service_names), out
    for name in project.mesh.service_names:
        assert f"✔ health {name}: process running, health SERVING" in lines["health"], out
    # A hung service (stopped, so it neither answers nor exits and gets restarted) is a ✘ with its log.
    pid = next(r.pid for r in running.read_processes() if r.name == "auth-svc")
    os.kill(pid, signal.SIGSTOP)
    try:
        code, lines, out = project.check(capsys)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert code == 1, out
    (bad,) = [line for line in out.splitlines() if line.startswith("✘")]
    assert "auth-svc: process running, health" in bad and "SERVING" not in bad
    assert f"see {running.log_file('auth-svc')}" in out

"""`meshctl apply` against a control plane's admin endpoint, without Envoy: the real /apply route and the
real checks up to the build (`parse_mesh`, the running set of services), on a stand-in ControlPlane.

The command leaves the checking to the control plane (it imports no config, no pydantic): a file that
does not load is refused with what `meshctl config validate` prints for it, naming the user's file.
The whole push, with Envoys ACKing, is tests/test_sidecar_e2e.py's.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from aivo_mesh.cli import main
from aivo_mesh.config import MeshSpec, load_mesh, parse_mesh
from aivo_mesh.runtime.control_plane import ControlPlane, _Source
from aivo_mesh.runtime.state import RuntimeInfo, StateDir
from aivo_mesh.telemetry.admin import AdminServer
from aivo_mesh.telemetry.metrics import MeshMetrics

ROOT = Path(__file__).resolve().parents[1]
RESULT = {"changed": ["learner-svc"], "build_seconds": 0.02,
          "nodes": [{"node": "learner-svc-0", "service": "learner-svc", "changed": True, "outcome": "acked"}]}


class StandIn:
    """What ControlPlane's /apply route uses of it: `apply`, here its checks without the build and the push."""

    def __init__(self, mesh: MeshSpec) -> None:
        self.mesh = mesh
        self.sources: list[str] = []  # the file names the route handed to apply
        self.applied = 0

    async def apply(self, text: str, source: str = "mesh.yaml") -> dict[str, Any]:
        self.sources.append(source)
        ControlPlane._keep_running_shape(cast(ControlPlane, self), parse_mesh(text, source))
        self.applied += 1
        return RESULT


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[tuple[StateDir, StandIn]]:
    """A state dir whose runtime.json names an admin endpoint serving ControlPlane's /apply route."""
    stand_in = StandIn(load_mesh(ROOT / "mesh.yaml"))
    cp = cast(ControlPlane, stand_in)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    admin = AdminServer(_Source(cp), MeshMetrics(), extra_routes=ControlPlane._routes(cp))
    port = asyncio.run_coroutine_threadsafe(admin.start(), loop).result(10)
    state = StateDir(tmp_path / "state")
    state.root.mkdir()
    RuntimeInfo(plane="sidecar", collector="127.0.0.1:4317",
                control_plane={"address": "127.0.0.1:1", "admin": f"127.0.0.1:{port}"}).write(state)
    try:
        yield state, stand_in
    finally:
        asyncio.run_coroutine_threadsafe(admin.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# A fresh interpreter runs the command and reports what it loaded.
_PROBE = """
import json, sys
from aivo_mesh.cli import main
code = main(sys.argv[2:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pydantic", "grpc", "cryptography")
                or m.startswith("aivo_mesh.config"))
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "loaded": loaded}, f)
"""


def _apply_in_a_new_process(tmp_path: Path, *argv: str,
                            env: dict[str, str] | None = None) -> tuple[int, list[str], str, str]:
    report = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, "-c", _PROBE, str(report), "apply", *argv], capture_output=True,
                          text=True, timeout=60, check=False, env=None if env is None else {**os.environ, **env})
    assert report.exists(), done.stderr
    data = json.loads(report.read_text())
    return data["code"], data["loaded"], done.stdout, done.stderr


def test_apply_to_a_running_control_plane_loads_no_config_and_prints_its_answer(control_plane, tmp_path):
    state, stand_in = control_plane
    code, loaded, out, err = _apply_in_a_new_process(tmp_path, str(ROOT / "mesh.yaml"), "--state-dir",
                                                     str(state.root), "-o", "json")
    assert code == 0, err
    assert json.loads(out) == RESULT
    assert loaded == [], f"meshctl apply loaded {loaded}"
    assert stand_in.sources == [str(ROOT / "mesh.yaml")] and stand_in.applied == 1


def test_apply_without_a_file_finds_mesh_yaml_as_config_validate_does_and_still_loads_no_config(
        control_plane, tmp_path):
    state, stand_in = control_plane
    code, loaded, _, err = _apply_in_a_new_process(tmp_path, "--state-dir", str(state.root), "-o", "json",
                                                   env={"AIVO_MESH_CONFIG": str(ROOT / "mesh.yaml")})
    assert code == 0, err
    assert loaded == [], f"meshctl apply loaded {loaded}"
    assert stand_in.sources == [str(ROOT / "mesh.yaml")]


def test_a_file_that_does_not_load_is_refused_as_config_validate_says_naming_the_users_file(
        control_plane, tmp_path, capsys):
    state, stand_in = control_plane
    bad = tmp_path / "mesh-é-š.yaml"  # a name HTTP headers cannot carry as is (š is not Latin-1)
    bad.write_text((ROOT / "mesh.yaml").read_text().replace("timeout: 10s", "timeout: soon", 1), encoding="utf-8")
    code, loaded, out, err = _apply_in_a_new_process(tmp_path, str(bad), "--state-dir", str(state.root))
    assert main(["config", "validate", str(bad)]) == 2
    validate = capsys.readouterr().err
    assert code == 2 and out == ""
    assert err == validate, (err, validate)
    assert str(bad) in err and "services[1].timeout" in err and "Traceback" not in err
    assert stand_in.sources == [str(bad)] and stand_in.applied == 0
    assert not any(m.startswith("aivo_mesh.config") for m in loaded), loaded


def test_a_valid_file_the_control_plane_cannot_apply_live_is_refused_naming_it(control_plane, tmp_path, capsys):
    state, stand_in = control_plane
    doc = yaml.safe_load((ROOT / "mesh.yaml").read_text())
    doc["services"].append(dict(doc["services"][-1], name="reports-svc", port=50099, local_port=8099,
                                admin_port=9199, allow=[],
                                sidecar={"inbound_port": 50098, "outbound_port": 15098, "admin_port": 9998}))
    more = tmp_path / "mesh.yaml"
    more.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["apply", str(more), "--state-dir", str(state.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {more}: ") and "reports-svc" in err and "meshctl up" in err, err
    assert stand_in.applied == 0


def test_without_a_control_plane_a_bad_file_gets_its_errors_and_a_good_one_the_news(tmp_path, capsys):
    state = StateDir(tmp_path / "state")
    bad = tmp_path / "mesh.yaml"
    bad.write_text((ROOT / "mesh.yaml").read_text().replace("timeout: 10s", "timeout: soon", 1))
    assert main(["apply", str(bad), "--state-dir", str(state.root)]) == 2
    err = capsys.readouterr().err
    assert "services[1].timeout" in err and "runtime.json" not in err, err
    assert main(["apply", str(ROOT / "mesh.yaml"), "--state-dir", str(state.root)]) == 2
    err = capsys.readouterr().err
    assert "no control plane runs" in err and "meshctl up" in err, err


def test_a_control_plane_that_does_not_answer_still_lets_a_bad_file_be_told(tmp_path, capsys):
    from aivo_mesh.runtime.local import free_port

    state = StateDir(tmp_path / "state")
    state.root.mkdir()
    RuntimeInfo(plane="sidecar", collector="127.0.0.1:4317",
                control_plane={"address": "127.0.0.1:1", "admin": f"127.0.0.1:{free_port()}"}).write(state)
    bad = tmp_path / "mesh.yaml"
    bad.write_text((ROOT / "mesh.yaml").read_text().replace("timeout: 10s", "timeout: soon", 1))
    assert main(["apply", str(bad), "--state-dir", str(state.root)]) == 2
    assert "services[1].timeout" in capsys.readouterr().err
    assert main(["apply", str(ROOT / "mesh.yaml"), "--state-dir", str(state.root)]) == 1
    err = capsys.readouterr().err
    assert "did not answer" in err and "meshctl status" in err, err

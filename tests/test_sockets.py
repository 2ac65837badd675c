"""The private folder of the local sidecar mesh's Unix sockets (runtime/sockets.py) and the plan that
uses it: where it goes, what it accepts, and that only the sidecar plane uses it."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2

from aivo_mesh.config import MeshSpec, load_mesh
from aivo_mesh.errors import MeshError
from aivo_mesh.runtime import mesh as runtime_mesh
from aivo_mesh.runtime.mesh import local_profile, plan, write_envoy_configs
from aivo_mesh.runtime.sockets import (
    SUN_PATH_MAX,
    app_socket,
    outbound_socket,
    remove_socket_dir,
    socket_dir,
    unix_listen_problem,
)
from aivo_mesh.runtime.state import StateDir
from aivo_mesh.xds.cache import CLUSTER, LISTENER
from aivo_mesh.xds.resources import Trust, sidecar_snapshot

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ["auth-svc", "learner-svc", "event-collector-svc", "analytics-svc"]


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_the_folder_is_run_under_the_state_dir_0700(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    folder = socket_dir(state, SERVICES)
    assert folder == state.resolve() / "run"
    assert _mode(folder) == 0o700 and os.lstat(folder).st_uid == os.getuid()
    folder.chmod(0o755)  # a looser folder of ours (an older run) is narrowed again
    assert socket_dir(state, SERVICES) == folder and _mode(folder) == 0o700
    assert app_socket(folder, "auth-svc") == folder / "auth-svc.app.sock"
    assert outbound_socket(folder, "auth-svc") == folder / "auth-svc.out.sock"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path (pytest's tmp_path is itself too deep for the fallback to fit)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="aivo-t", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def deep_state(tmp_path: Path) -> Path:
    """A state dir too deep for `<state>/run/<svc>.out.sock` to fit in sun_path."""
    state = tmp_path / ("d" * 60) / ("e" * 60)
    state.mkdir(parents=True)
    assert len(os.fsencode(state / "run" / "event-collector-svc.out.sock")) > SUN_PATH_MAX
    return state


def test_a_deep_state_dir_uses_a_private_folder_under_xdg_runtime_dir(
        deep_state: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = short_dir
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    folder = socket_dir(deep_state, SERVICES)
    assert folder.parent == runtime and folder.name.startswith("aivo-mesh-")
    assert _mode(folder) == 0o700
    assert socket_dir(deep_state, SERVICES) == folder  # the same state dir finds the same folder
    assert len(os.fsencode(outbound_socket(folder, "event-collector-svc"))) <= SUN_PATH_MAX
    remove_socket_dir(folder)
    assert not folder.exists()


@pytest.fixture
def private_tmp(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile.gettempdir() pointed at a folder of this test, and no XDG_RUNTIME_DIR."""
    import tempfile

    tmp = short_dir
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def test_without_xdg_runtime_dir_the_folder_is_per_user_in_tmp(deep_state: Path, private_tmp: Path) -> None:
    folder = socket_dir(deep_state, SERVICES)
    assert folder.parent == private_tmp and folder.name.startswith(f"aivo-mesh-{os.getuid()}-")
    assert _mode(folder) == 0o700


def test_a_symlink_or_a_file_in_place_of_the_folder_is_refused(tmp_path: Path, deep_state: Path,
                                                               private_tmp: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    (state / "run").symlink_to(elsewhere)
    with pytest.raises(MeshError, match="not a directory"):
        socket_dir(state, SERVICES)
    # In a shared /tmp someone could create the folder before us: never used.
    squat = socket_dir(deep_state, SERVICES)
    squat.rmdir()
    squat.write_text("")
    with pytest.raises(MeshError, match="not a directory"):
        socket_dir(deep_state, SERVICES)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder owned by another user")
def test_a_folder_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True, mode=0o700)
    os.chown(state / "run", 65534, 65534)
    with pytest.raises(MeshError, match="belongs to uid 65534"):
        socket_dir(state, SERVICES)


def test_unix_listen_problem_tells_a_leftover_from_a_socket_in_use(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    assert unix_listen_problem(path, "x") is None  # nothing there
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        assert unix_listen_problem(path, "auth-svc (gRPC)") == (
            f"unix:{path} in use: auth-svc (gRPC) cannot listen there (another process has it)")
    assert unix_listen_problem(path, "x") is None  # a crashed process's socket: replaced on bind
    path.unlink()
    path.write_text("")
    assert "not a socket" in str(unix_listen_problem(path, "x"))
    assert "is not a directory" in str(unix_listen_problem(tmp_path / "no" / "a.sock", "x"))
    assert "longer than" in str(unix_listen_problem("/" + "x" * 200, "x"))


@pytest.fixture
def mesh() -> MeshSpec:
    return load_mesh(ROOT / "mesh.yaml")


def test_the_sidecar_plan_puts_both_plaintext_legs_on_the_sockets(tmp_path: Path, mesh: MeshSpec,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_mesh, "envoy_binary", lambda: "/usr/bin/envoy")
    state = StateDir(tmp_path / "state")
    state.ensure()
    procs, info = plan(state, mesh, "sidecar", collector_port=None)
    folder = state.root.resolve() / "run"
    assert info.sockets == str(folder)
    auth = next(m for m in procs if m.name == "auth-svc")
    app, out = folder / "auth-svc.app.sock", folder / "auth-svc.out.sock"
    assert auth.address == f"unix:{app}"
    argv = auth.argv[auth.argv.index("--insecure"):]
    assert argv == ["--insecure", "--unix-socket", str(app), "--sidecar-outbound", f"unix:{out}"]
    assert "--port" not in auth.argv
    assert (info.services["auth-svc"].app, info.services["auth-svc"].outbound) == (f"unix:{app}", f"unix:{out}")
    # The Envoys take their listeners and clusters from the control plane, which runs with that folder.
    cp = next(m for m in procs if m.name == "control-plane")
    assert cp.argv[cp.argv.index("--sockets") + 1] == str(folder)
    static = write_envoy_configs(state, mesh, None, folder, control_plane=False)["auth-svc"].read_text()
    assert f"path: {out}\n        mode: 384" in static and f"path: {app}\n" in static
    snap = sidecar_snapshot(mesh, "auth-svc", local_profile(state, "auth-svc", None, folder), Trust(b"ca"))
    listeners = {r.address.pipe.path: r.address.pipe.mode for r in snap.resources[LISTENER].values()
                 if isinstance(r, listener_pb2.Listener)}
    assert listeners.get(str(out)) == 0o600
    local_app = snap.resources[CLUSTER]["local_app"]
    assert isinstance(local_app, cluster_pb2.Cluster)
    assert [e.endpoint.address.pipe.path for g in local_app.load_assignment.endpoints
            for e in g.lb_endpoints] == [str(app)]


def test_the_proxyless_plan_is_unchanged(tmp_path: Path, mesh: MeshSpec) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    procs, info = plan(state, mesh, "proxyless", collector_port=None)
    assert info.sockets is None and not (state.root / "run").exists()
    # The control plane, and every service at its own address taking its configuration from it.
    assert [m.name for m in procs if m.role == "control-plane"] == ["control-plane"]
    for m in procs:
        if m.role == "control-plane":
            assert "--sockets" not in m.argv
            assert [m.argv[i + 1] for i, a in enumerate(m.argv) if a == "--direct"] == list(mesh.service_names)
            continue
        assert m.argv[m.argv.index("--control-plane") + 1] == mesh.control_plane.address
        svc = mesh.service(m.name)
        assert m.address == f"{svc.host}:{svc.port}"
        assert "--unix-socket" not in m.argv and "--insecure" not in m.argv
        assert (info.services[m.name].app, info.services[m.name].outbound) == (None, None)
